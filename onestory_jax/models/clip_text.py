"""CLIP text-image similarity (Radford et al. 2021, arXiv 2103.00020): the text tower and the joint model, in Flax.

OneStory (arXiv 2512.07802, Sec. 5.1) scores how well each generated shot follows its caption ("Semantic
Alignment") with ViCLIP, a video CLIP from InternVid. ViCLIP has no JAX port, so :mod:`onestory_jax.metrics.
narrative_metrics` scores caption alignment with an image CLIP instead: the mean over a shot's frames of the cosine
between the caption's and the frame's embeddings. This module is that CLIP. The semantics are transformers'
``CLIPModel`` (``get_text_features`` / ``get_image_features``):

  text:   h_0 = E_tok[ids] + E_pos[0..N)                                    # N <= max_position_embeddings (77)
          h_i = h_{i-1} + Attn(LN1(h_{i-1}), causal & padding mask); h_i += MLP(LN2(h_i))   # i = 1..L
          pooled = LN_final(h_L)[eos position];  text_embeds = pooled @ W_text_proj        # no bias
  image:  pooled = LN_post(ViT(pixels)[:, 0]);   image_embeds = pooled @ W_visual_proj     # no bias

The vision tower is :class:`onestory_jax.models.wan.clip.CLIPVisionTransformer` (Wan2.1's image encoder is the same
architecture); the encoder layers are its :class:`~onestory_jax.models.wan.clip.CLIPEncoderLayer`, given a mask.
The EOS position follows transformers: the first ``eos_token_id`` in the row, or, for configs that still say
``eos_token_id = 2`` (written before transformers' PR 24773), the position of the largest id (CLIP's end-of-text token
has the largest id of its vocabulary).

Weights: a transformers ``CLIPModel`` folder (``save_pretrained``: ``config.json`` with ``text_config`` and
``vision_config``, ``model.safetensors`` or shards; never a pickle) and its ``tokenizer.json`` (the fast tokenizer,
which the published ``openai/clip-*`` and ``laion/CLIP-*`` releases carry). :func:`torch_key_to_target` maps

  vision_model.*                                   -> vision/* (the vision tower's key map)
  visual_projection.weight / text_projection.weight -> visual_projection/kernel / text_projection/kernel
  text_model.embeddings.{token,position}_embedding.weight -> text/{token,position}_embedding
  text_model.encoder.layers.N.*                     -> text/layers_N/* (as the vision tower's layers)
  text_model.final_layer_norm.{weight,bias}         -> text/final_norm/{scale,bias}

and skips ``logit_scale`` (cosines need no temperature) and the ``position_ids`` buffers. :func:`load_clip` reads a
folder into ``(module, params, tokenizer, processor)``.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from onestory_jax import sharding
from onestory_jax import weights
from onestory_jax.models import dinov2 as dinov2_lib
from onestory_jax.models import layers
from onestory_jax.models.wan import clip as vision_lib

Dtype = Any


def _partitioned(init, axes):
  return nn.with_logical_partitioning(init, axes)


class CLIPTextTransformer(nn.Module):
  """CLIP's text tower: token ids ``[B, N]`` (and a padding mask) -> (hidden states ``[B, N, D]``, pooled ``[B, D]``).

  Attributes:
    vocab_size: token embedding rows (49408 for the published CLIPs).
    hidden_size: width D (512 for ViT-B, 768 for ViT-L, 1024 for ViT-H).
    intermediate_size: MLP width.
    num_layers: transformer layers L.
    num_heads: attention heads.
    max_position_embeddings: the longest sequence (77).
    eos_token_id: the end-of-text id that marks the pooled position (2: the largest id, see the module docstring).
    eps: LayerNorm epsilon.
    act: MLP activation (``quick_gelu`` for OpenAI's CLIPs, ``gelu`` for LAION's ViT-H/14).
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  max_position_embeddings: int = 77
  eos_token_id: int = 49407
  eps: float = 1e-5
  act: str = "quick_gelu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Args: ``input_ids`` int ``[B, N]``; ``attention_mask`` ``[B, N]`` (nonzero = a real token; None: all real).

    Returns ``(last_hidden_state [B, N, D], pooler_output [B, D])`` as transformers' ``CLIPTextModel`` does.
    """
    b, n = input_ids.shape
    if n > self.max_position_embeddings:
      raise ValueError(
          f"CLIPTextTransformer: {n} tokens, more than max_position_embeddings = {self.max_position_embeddings}"
      )
    d = self.hidden_size
    tok = self.param(
        "token_embedding",
        _partitioned(nn.initializers.normal(0.02), (None, "embed")),
        (self.vocab_size, d),
        self.param_dtype,
    )
    pos = self.param(
        "position_embedding",
        _partitioned(nn.initializers.normal(0.01), (None, "embed")),
        (self.max_position_embeddings, d),
        self.param_dtype,
    )
    x = (jnp.take(tok, input_ids, axis=0) + pos[None, :n]).astype(self.dtype)
    mask = jnp.tril(jnp.ones((n, n), bool))[None, None]  # [1, 1, Q, K]
    if attention_mask is not None:
      mask = mask & (attention_mask != 0)[:, None, None, :]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(self.num_layers):
      x = vision_lib.CLIPEncoderLayer(
          self.num_heads, self.intermediate_size, self.act, self.eps, name=f"layers_{i}", **kw
      )(x, mask)
    x = layers.layer_norm(self.eps, name="final_norm", **kw)(x)
    if self.eos_token_id == 2:
      where = jnp.argmax(input_ids, axis=-1)
    else:
      where = jnp.argmax((input_ids == self.eos_token_id).astype(jnp.int32), axis=-1)
    return x, x[jnp.arange(b), where]


class CLIPModel(nn.Module):
  """The joint CLIP: :meth:`text_features` and :meth:`image_features` in one embedding space (``projection_dim``).

  Attributes (``flax.core.FrozenDict`` for the sizes, so that the module hashes, as ``jax.jit`` needs):
    vision: the vision tower's sizes (:func:`onestory_jax.models.wan.clip.config_from_transformers` without 'name').
    text: the text tower's sizes (:class:`CLIPTextTransformer`'s fields).
    projection_dim: the shared embedding width.
  """

  vision: dict
  text: dict
  projection_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.vision_model = vision_lib.CLIPVisionTransformer(**self.vision, **kw, name="vision")
    self.text_model = CLIPTextTransformer(**self.text, **kw, name="text")
    init = nn.initializers.normal(0.02)
    self.visual_projection = nn.Dense(
        self.projection_dim, use_bias=False, kernel_init=_partitioned(init, ("embed", None)), **kw
    )
    self.text_projection = nn.Dense(
        self.projection_dim, use_bias=False, kernel_init=_partitioned(init, ("embed", None)), **kw
    )

  def __call__(self, pixels: jax.Array, input_ids: jax.Array, attention_mask: jax.Array | None = None):
    """(image_embeds ``[B, P]``, text_embeds ``[B', P]``), unnormalised (also what ``init`` traces)."""
    return self.image_features(pixels), self.text_features(input_ids, attention_mask)

  def image_features(self, pixels: jax.Array) -> jax.Array:
    """transformers' ``get_image_features``: normalised pixels ``[B, S, S, 3]`` -> ``[B, projection_dim]``."""
    return self.visual_projection(self.vision_model.pooled(pixels))

  def text_features(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """transformers' ``get_text_features``: ids ``[B, N]`` -> ``[B, projection_dim]``."""
    return self.text_projection(self.text_model(input_ids, attention_mask)[1])


# ---------------------------------------------------------------------------- configs and weights
_TEXT_FIELDS = {  # our field -> CLIPTextConfig field
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "max_position_embeddings": "max_position_embeddings",
}
_TEXT_DEFAULTS = {"max_position_embeddings": 77}  # transformers' CLIPTextConfig defaults for fields a file may omit


def config_from_transformers(cfg: Any) -> dict:
  """:class:`CLIPModel` fields from a transformers ``CLIPConfig`` dict (model_type 'clip').

  Raises:
    ValueError: not a CLIPConfig, or a field missing, not a positive int, or an activation this port does not compute.
  """
  if not isinstance(cfg, dict) or cfg.get("model_type") != "clip":
    got = cfg.get("model_type") if isinstance(cfg, dict) else type(cfg).__name__
    raise ValueError(
        f"CLIP config: expected a CLIPModel config (model_type 'clip', with text_config and vision_config), got {got!r}"
    )
  vision = {k: v for k, v in vision_lib.config_from_transformers(cfg).items() if k != "name"}
  text_cfg = cfg.get("text_config")
  if not isinstance(text_cfg, dict):
    raise ValueError("CLIP config: text_config: expected an object")
  text_cfg = {**_TEXT_DEFAULTS, **text_cfg}
  text: dict[str, Any] = weights.positive_int_fields(text_cfg, _TEXT_FIELDS, "CLIP config: text_config")
  if text["hidden_size"] % text["num_heads"]:
    raise ValueError(
        f"CLIP config: text_config.hidden_size = {text['hidden_size']} is not divisible by num_attention_heads = "
        f"{text['num_heads']}"
    )
  eos = text_cfg.get("eos_token_id", 49407)
  if isinstance(eos, list) and len(eos) == 1:
    eos = eos[0]
  if isinstance(eos, bool) or not isinstance(eos, int):
    raise ValueError(f"CLIP config: text_config.eos_token_id: expected one int, got {eos!r}")
  text["eos_token_id"] = eos
  text["eps"] = float(text_cfg.get("layer_norm_eps", 1e-5))
  act = text_cfg.get("hidden_act", "quick_gelu")
  if act not in vision_lib.ACTIVATIONS:
    raise ValueError(
        f"CLIP config: text_config.hidden_act must be one of {sorted(vision_lib.ACTIVATIONS)}, got {act!r}"
    )
  text["act"] = act
  proj = cfg.get("projection_dim", 512)  # transformers' CLIPConfig default
  if isinstance(proj, bool) or not isinstance(proj, int) or proj < 1:
    raise ValueError(f"CLIP config: projection_dim: expected a positive int, got {proj!r}")
  return {"vision": vision, "text": text, "projection_dim": proj}


def abstract_params(module: CLIPModel, *, boxed: bool = False) -> Any:
  """The parameter tree of ``module`` as ``jax.ShapeDtypeStruct`` leaves (nothing allocated)."""
  s, c = module.vision["image_size"], module.vision.get("num_channels", 3)
  params = jax.eval_shape(
      module.init, jax.random.key(0), jnp.zeros((1, s, s, c), jnp.float32), jnp.zeros((1, 2), jnp.int32)
  )["params"]
  return params if boxed else sharding.strip_boxes(params)


_TEXT_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")


def torch_key_to_target(name: str) -> weights.Target | None:
  """Where one tensor of a transformers ``CLIPModel`` state dict goes (see the module docstring).

  Raises:
    ValueError: for a name that is not a CLIPModel parameter, naming it.
  """
  if name in ("logit_scale", "text_model.embeddings.position_ids"):
    return None
  if name in ("visual_projection.weight", "text_projection.weight"):
    return weights.Target((name.split(".")[0], "kernel"), weights.linear)
  if name.startswith("vision_model."):
    target = vision_lib.torch_key_to_target(name)
    return None if target is None else weights.Target(("vision",) + target.path, target.transform)
  if name == "text_model.embeddings.token_embedding.weight":
    return weights.Target(("text", "token_embedding"))
  if name == "text_model.embeddings.position_embedding.weight":
    return weights.Target(("text", "position_embedding"))
  if name in ("text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias"):
    return weights.Target(("text", "final_norm", "scale" if name.endswith("weight") else "bias"))
  m = _TEXT_LAYER.fullmatch(name)
  if m:
    leaf = vision_lib.layer_target(("text", f"layers_{int(m.group(1))}"), m.group(2), m.group(3))
    if leaf is not None:
      return leaf
  raise ValueError(
      f"CLIP checkpoint: unknown tensor name {name!r} (expected a CLIPModel parameter: vision_model.*, text_model.*, "
      "visual_projection.weight, text_projection.weight, logit_scale)"
  )


# ---------------------------------------------------------------------------- the tokenizer
class CLIPTokenizer:
  """A CLIP release's ``tokenizer.json`` (the fast tokenizer: lower-casing, BPE, ``<|startoftext|> ... <|endoftext|>``).

  :meth:`encode` returns ids ``[N, max_len]`` and the padding mask, cut to ``max_len`` (77) tokens with the end-of-text
  token kept, and padded with the release's pad token (``tokenizer_config.json``'s ``pad_token``; ``<|endoftext|>``
  when it names none), as transformers' ``CLIPTokenizerFast(padding='max_length', truncation=True)`` does.
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, max_len: int, pad_id: int):
    self._tokenizer = tokenizer
    self.max_len = int(max_len)
    self.pad_id = int(pad_id)
    tokenizer.enable_truncation(self.max_len)
    tokenizer.enable_padding(length=self.max_len, pad_id=self.pad_id)

  @classmethod
  def from_directory(cls, directory: str, max_len: int, eos_token_id: int) -> "CLIPTokenizer":
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
      raise ValueError(
          f"{path}: missing (a CLIP release folder carries the fast tokenizer's tokenizer.json next to config.json)"
      )
    try:
      tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises its own Exception subclass for a malformed file
      raise ValueError(f"{path}: not a tokenizers file ({e})") from e
    pad_id = tok.token_to_id("<|endoftext|>")
    if pad_id is None:
      pad_id = eos_token_id
    cfg_path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(cfg_path):
      try:
        with open(cfg_path) as f:
          pad = json.load(f).get("pad_token")
      except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{cfg_path}: not a JSON object ({e})") from e
      if isinstance(pad, dict):  # an AddedToken record
        pad = pad.get("content")
      if pad is not None:
        if tok.token_to_id(pad) is None:
          raise ValueError(f"{cfg_path}: pad_token {pad!r} is not in {path}")
        pad_id = tok.token_to_id(pad)
    return cls(tok, max_len, pad_id)

  def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``texts`` -> (int32 ids ``[N, max_len]``, int32 mask ``[N, max_len]``, 1 on real tokens)."""
    out = self._tokenizer.encode_batch([str(t) for t in texts])
    ids = np.asarray([e.ids for e in out], np.int32).reshape(len(texts), self.max_len)
    mask = np.asarray([e.attention_mask for e in out], np.int32).reshape(len(texts), self.max_len)
    return ids, mask


def load_clip(directory: str, *, dtype: Dtype = jnp.float32) -> tuple[CLIPModel, dict, CLIPTokenizer, dict]:
  """Loads a transformers ``CLIPModel`` folder: ``(module, params, tokenizer, processor)``.

  ``processor`` holds :func:`onestory_jax.models.wan.clip.preprocess`'s arguments from ``preprocessor_config.json``
  (CLIPImageProcessor's defaults at the tower's image size when the file is absent).

  Raises:
    ValueError: a missing or malformed file (naming it and what was expected), or weights whose keys or shapes do not
      fit the config (naming each key).
  """
  cfg = dinov2_lib.read_config(directory)
  config_path = os.path.join(directory, "config.json")
  try:
    fields = config_from_transformers(cfg)
    module = CLIPModel(  # frozen dicts: the module is hashable, a static argument of jit
        vision=flax.core.FrozenDict(fields["vision"]),
        text=flax.core.FrozenDict(fields["text"]),
        projection_dim=fields["projection_dim"],
        dtype=dtype,
    )
  except ValueError as e:
    raise ValueError(f"{config_path}: {e}") from e
  params = dinov2_lib.load_safetensors_params(
      directory, torch_key_to_target, abstract_params(module), what="CLIP checkpoint"
  )
  tokenizer = CLIPTokenizer.from_directory(
      directory, module.text["max_position_embeddings"], module.text["eos_token_id"]
  )
  size = module.vision["image_size"]
  processor = {"crop_size": size, "shortest_edge": size, "mean": vision_lib.CLIP_MEAN, "std": vision_lib.CLIP_STD}
  proc_path = os.path.join(directory, "preprocessor_config.json")
  if os.path.isfile(proc_path):
    try:
      with open(proc_path) as f:
        processor = vision_lib.processor_config_from_transformers(json.load(f))
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
      raise ValueError(f"{proc_path}: {e}") from e
    if processor["crop_size"] != size:
      raise ValueError(f"{proc_path}: crop_size {processor['crop_size']} is not the vision tower's image_size {size}")
  return module, params, tokenizer, processor
