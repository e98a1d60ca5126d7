"""CLIP ViT vision tower in Flax Linen (the I2V image encoder of Wan2.1; ViT-H/14 there).

Wan2.1-I2V feeds the start image to its DiT as image tokens through a decoupled image
cross-attention. The tokens are the penultimate hidden states of a CLIP ViT-H/14 vision tower:
diffusers' ``WanImageToVideoPipeline.encode_image`` runs transformers' ``CLIPVisionModel`` with
``output_hidden_states=True`` and keeps ``hidden_states[-2]``: 257 tokens (CLS + 16 x 16 patches)
of width 1280 for a 224 x 224 input. OneStory (arXiv 2512.07802, Sec. 4.1) keeps that path for
the first shot of I2MSV.

The semantics are those of transformers' ``CLIPVisionModel`` (modeling_clip.py):

  x = [class_embedding; patches(pixels) @ W_patch] + position_embedding   # conv, no bias
  h_0 = LayerNorm_pre(x)
  h_i = h_{i-1} + Attn(LN1(h_{i-1}));  h_i = h_i + MLP(LN2(h_i))          # i = 1..L
  hidden_states = (h_0, ..., h_L);  pooled = LayerNorm_post(h_L[:, 0])

Attention: fused-width q/k/v/out projections with biases, logits scaled by 1/sqrt(head_dim),
softmax in float32. MLP: fc1, activation (``gelu`` (erf) for ViT-H/14 from open_clip,
``quick_gelu`` for OpenAI's CLIP), fc2. Only the hidden states up to the requested one are
computed (the last layer and the post-norm are skipped for ``layer=-2``), but every parameter of
the published tower exists, so a converted checkpoint maps one to one.

:func:`preprocess` reproduces transformers' ``CLIPImageProcessor`` (Wan's
``image_processor/``) in-graph: shortest edge resized to 224 with a bicubic (Keys, a = -0.5)
filter that widens when it shrinks, as PIL's does; centre crop; CLIP mean / std. PIL resizes
uint8 images and rounds to uint8 after each (horizontal, then vertical) pass; :func:`preprocess`
rounds at the same places, so it matches the processor to one uint8 step (see the test).

:func:`torch_key_to_target` maps the published tensor names to this module's parameters;
:func:`config_from_transformers` and :func:`abstract_params_from_transformers` read a release's
``image_encoder/config.json``, :func:`processor_config_from_transformers` its
``image_processor/preprocessor_config.json``.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from onestory_jax import sharding
from onestory_jax import weights
from onestory_jax.models import layers

Dtype = Any

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


# The projections start from N(0, 0.02); a converted checkpoint replaces them.
_DENSE_INIT = nn.initializers.normal(0.02)


def _partitioned(init, axes):
  return nn.with_logical_partitioning(init, axes)


class CLIPAttention(nn.Module):
  """Multi-head self-attention with biased q/k/v/o projections of the full width.

  The projections keep transformers' fused layout (``[D, heads * head_dim]`` kernels, so the
  published weights only transpose); the fused axis carries the logical name 'heads', which
  splits it at head boundaries when sharded. ``mask`` (bool, broadcastable to ``[B, heads, Q, K]``, True = attend)
  is what the text tower's causal and padding masks use (:mod:`onestory_jax.models.clip_text`); masked logits take
  float32's lowest value, as transformers' masks add it.
  """

  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    b, n, d = x.shape
    head_dim = d // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_DENSE_INIT)
    split = lambda t: t.reshape(b, n, self.num_heads, head_dim)  # noqa: E731
    q = split(layers.dense(d, ("embed", "heads"), "q", **kw)(x))
    k = split(layers.dense(d, ("embed", "heads"), "k", **kw)(x))
    v = split(layers.dense(d, ("embed", "heads"), "v", **kw)(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits * head_dim**-0.5, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, d)
    out = nn.with_logical_constraint(out, ("batch", "length", "heads"))
    return layers.dense(d, ("heads", "embed"), "o", **kw)(out)


class CLIPEncoderLayer(nn.Module):
  """Pre-norm residual block: attention, then fc1 -> activation -> fc2."""

  num_heads: int
  intermediate_size: int
  act: str = "gelu"
  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = x.shape[-1]
    attn = CLIPAttention(self.num_heads, name="attn", **kw)
    x = x + attn(layers.layer_norm(self.eps, name="norm1", **kw)(x), mask)
    h = layers.layer_norm(self.eps, name="norm2", **kw)(x)
    fc1 = layers.dense(self.intermediate_size, ("embed", "mlp"), "fc1", kernel_init=_DENSE_INIT, **kw)
    h = nn.with_logical_constraint(ACTIVATIONS[self.act](fc1(h)), ("batch", "length", "mlp"))
    x = x + layers.dense(d, ("mlp", "embed"), "fc2", kernel_init=_DENSE_INIT, **kw)(h)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class CLIPVisionTransformer(nn.Module):
  """CLIP's vision tower: normalised pixels [B, S, S, C] -> hidden states [B, 1 + (S/p)^2, D].

  Attributes:
    hidden_size: width D (1280 for ViT-H/14).
    intermediate_size: MLP width (5120).
    num_layers: transformer layers L (32).
    num_heads: attention heads (16).
    patch_size: patch p (14).
    image_size: input side S (224); inputs must be exactly S x S (no position interpolation).
    num_channels: input channels (3).
    eps: LayerNorm epsilon (1e-5).
    act: MLP activation: 'gelu' (erf; ViT-H/14), 'quick_gelu' (OpenAI CLIP), 'gelu_new' /
      'gelu_pytorch_tanh' (tanh approximation).
    dtype: compute dtype (LayerNorm statistics and softmax in float32).
    param_dtype: parameter dtype.
  """

  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  patch_size: int
  image_size: int
  num_channels: int = 3
  eps: float = 1e-5
  act: str = "gelu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    for field in (
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "patch_size",
        "image_size",
        "num_channels",
    ):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"CLIPVisionTransformer: {field} must be a positive int, got {value!r}")
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"CLIPVisionTransformer: hidden_size = {self.hidden_size} must be divisible "
          f"by num_heads = {self.num_heads}"
      )
    if self.image_size % self.patch_size:
      raise ValueError(
          f"CLIPVisionTransformer: image_size = {self.image_size} must be divisible by "
          f"patch_size = {self.patch_size}"
      )
    if self.act not in ACTIVATIONS:
      raise ValueError(f"CLIPVisionTransformer: act must be one of {sorted(ACTIVATIONS)}, got " f"{self.act!r}")
    d, p = self.hidden_size, self.patch_size
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.class_embedding = self.param(
        "class_embedding", _partitioned(nn.initializers.normal(d**-0.5), ("embed",)), (d,), self.param_dtype
    )
    self.patch_kernel = self.param(  # Flax conv layout [p, p, C, D]
        "patch_embedding",
        _partitioned(nn.initializers.lecun_normal(), (None, None, "conv_in", "embed")),
        (p, p, self.num_channels, d),
        self.param_dtype,
    )
    self.position_embedding = self.param(
        "position_embedding",
        _partitioned(nn.initializers.normal(0.02), (None, "embed")),
        (self.num_tokens, d),
        self.param_dtype,
    )
    self.pre_norm = layers.layer_norm(self.eps, **kw)
    self.layers = [
        CLIPEncoderLayer(self.num_heads, self.intermediate_size, self.act, self.eps, **kw)
        for _ in range(self.num_layers)
    ]
    self.post_norm = layers.layer_norm(self.eps, **kw)

  @property
  def num_tokens(self) -> int:
    """1 (CLS) + (image_size / patch_size)^2 (257 for ViT-H/14 at 224)."""
    return 1 + (self.image_size // self.patch_size) ** 2

  def _embed(self, pixels: jax.Array) -> jax.Array:
    s, p, c = self.image_size, self.patch_size, self.num_channels
    if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (s, s, c):
      raise ValueError(
          f"CLIPVisionTransformer: pixels must be [B, {s}, {s}, {c}] (normalised, "
          f"channels last), got shape {tuple(pixels.shape)}"
      )
    b, g = pixels.shape[0], s // p
    patches = pixels.astype(self.dtype).reshape(b, g, p, g, p, c)
    x = jnp.einsum("bhpwqc,pqcd->bhwd", patches, self.patch_kernel.astype(self.dtype))
    x = x.reshape(b, g * g, self.hidden_size)
    cls = jnp.broadcast_to(self.class_embedding.astype(self.dtype), (b, 1, self.hidden_size))
    x = jnp.concatenate([cls, x], axis=1) + self.position_embedding.astype(self.dtype)[None]
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))

  def __call__(self, pixels: jax.Array, layer: int = -2) -> jax.Array:
    """``hidden_states[layer]`` of transformers' CLIPVisionModel (``layer=-2``: Wan's tokens).

    Args:
      pixels: [B, S, S, C] normalised pixels (:func:`preprocess`), channels last.
      layer: index into the L + 1 hidden states (0: after the pre-norm; L or -1: the last
        layer's output, transformers' ``last_hidden_state``; -2: the penultimate layer's).

    Returns:
      [B, 1 + (S/p)^2, hidden_size].
    """
    n = self.num_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not -(n + 1) <= layer <= n:
      raise ValueError(f"CLIPVisionTransformer: layer must be an int in [{-(n + 1)}, {n}], got " f"{layer!r}")
    depth = layer % (n + 1)
    x = self.pre_norm(self._embed(pixels))
    out = x
    for i, block in enumerate(self.layers):
      if i >= depth and not self.is_initializing():
        break
      x = block(x)
      if i + 1 == depth:
        out = x
    if self.is_initializing():  # create every parameter of the published tower
      self.post_norm(x[:, 0])
    return out

  def pooled(self, pixels: jax.Array) -> jax.Array:
    """transformers' ``pooler_output``: the post-norm of the last layer's CLS token, [B, D]."""
    return self.post_norm(self(pixels, layer=-1)[:, 0])


# ---------------------------------------------------------------------------- preprocessing
def resize_output_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
  """(h, w) after resizing the shorter side to ``shortest_edge`` (the longer: int(s * long / short))."""
  if height < 1 or width < 1:
    raise ValueError(f"CLIP preprocess: image size must be positive, got {(height, width)}")
  if height <= width:
    return shortest_edge, int(shortest_edge * width / height)
  return int(shortest_edge * height / width), shortest_edge


def _round_u8(x: jax.Array) -> jax.Array:
  return jnp.clip(jnp.floor(x + 0.5), 0.0, 255.0)


def preprocess(
    images: jax.Array,
    *,
    crop_size: int = 224,
    shortest_edge: int | None = None,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> jax.Array:
  """CLIPImageProcessor in JAX: [B, H, W, 3] in [-1, 1] -> normalised [B, crop, crop, 3].

  Steps: quantise to uint8 values (what the processor receives), resize the shorter side to
  ``shortest_edge`` (default ``crop_size``) with antialiased bicubic, rounding to uint8 after the
  horizontal and after the vertical pass as PIL does, centre-crop ``crop_size`` (top / left at
  ``(size - crop) // 2``), rescale by 1/255, then ``(x - mean) / std``.
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"CLIP preprocess: images must be [B, H, W, 3] in [-1, 1], got shape " f"{tuple(images.shape)}")
  if len(mean) != 3 or len(std) != 3:
    raise ValueError(f"CLIP preprocess: mean and std must have 3 entries, got {mean!r}, {std!r}")
  b, h, w, _ = images.shape
  shortest_edge = crop_size if shortest_edge is None else shortest_edge
  oh, ow = resize_output_size(h, w, shortest_edge)
  if oh < crop_size or ow < crop_size:
    raise ValueError(
        f"CLIP preprocess: resized size {(oh, ow)} is smaller than crop_size "
        f"{crop_size} (shortest_edge = {shortest_edge})"
    )
  x = _round_u8((images.astype(jnp.float32) + 1.0) * 127.5)
  if ow != w:
    x = _round_u8(jax.image.resize(x, (b, h, ow, 3), "bicubic", antialias=True))
  if oh != h:
    x = _round_u8(jax.image.resize(x, (b, oh, ow, 3), "bicubic", antialias=True))
  top, left = (oh - crop_size) // 2, (ow - crop_size) // 2
  x = x[:, top : top + crop_size, left : left + crop_size] / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


# ---------------------------------------------------------------------------- published weights
_FIELDS = {  # our config field -> transformers CLIPVisionConfig field
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "patch_size": "patch_size",
    "image_size": "image_size",
}


def config_from_transformers(cfg: dict) -> dict:
  """Sizes of ``config.image_encoder`` (name 'clip_vision') from a transformers CLIP config dict.

  Args:
    cfg: the parsed ``image_encoder/config.json`` (a ``CLIPVisionConfig``, model_type
      'clip_vision_model'), or a full ``CLIPConfig`` (model_type 'clip'), whose
      ``vision_config`` is used.

  Returns:
    ``{'name': 'clip_vision', 'hidden_size', 'intermediate_size', 'num_layers', 'num_heads',
    'patch_size', 'image_size', 'num_channels', 'eps', 'act'}``.

  Raises:
    ValueError: a field is missing or invalid, or the activation is not one this port computes.
  """
  if not isinstance(cfg, dict):
    raise ValueError(f"CLIP config: expected a dict (config.json), got {type(cfg).__name__}")
  if cfg.get("model_type") == "clip":
    cfg = cfg.get("vision_config") or {}
    cfg = {"model_type": "clip_vision_model", **cfg}
  if cfg.get("model_type") != "clip_vision_model":
    raise ValueError(
        f"CLIP config: model_type must be 'clip_vision_model' or 'clip', got " f"{cfg.get('model_type')!r}"
    )
  out: dict[str, Any] = {"name": "clip_vision", **weights.positive_int_fields(cfg, _FIELDS, "CLIP config")}
  out["num_channels"] = int(cfg.get("num_channels", 3))
  out["eps"] = float(cfg.get("layer_norm_eps", 1e-5))
  act = cfg.get("hidden_act", "quick_gelu")  # transformers' CLIPVisionConfig default
  if act not in ACTIVATIONS:
    raise ValueError(f"CLIP config: hidden_act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
  out["act"] = act
  return out


def abstract_params_from_transformers(cfg: dict, *, boxed: bool = False, param_dtype: Any = jnp.float32) -> Any:
  """Abstract parameter tree of the tower that a CLIP config.json describes.

  Leaves are ``jax.ShapeDtypeStruct`` (nothing is allocated); with ``boxed``, Flax's
  logical-partitioning boxes are kept (for sharding rules).
  """
  sizes = {k: v for k, v in config_from_transformers(cfg).items() if k != "name"}
  module = CLIPVisionTransformer(**sizes, param_dtype=param_dtype)
  s, c = sizes["image_size"], sizes["num_channels"]
  params = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, s, s, c), jnp.float32))["params"]
  return params if boxed else sharding.strip_boxes(params)


def processor_config_from_transformers(cfg: dict) -> dict:
  """:func:`preprocess` arguments from a ``CLIPImageProcessor`` dict (``preprocessor_config.json``).

  Returns ``{'crop_size', 'shortest_edge', 'mean', 'std'}``. Raises ValueError for settings
  :func:`preprocess` does not compute (a filter other than bicubic, no resize / crop /
  rescale / normalisation, a non-square crop, a rescale factor other than 1/255).
  """
  if not isinstance(cfg, dict):
    raise ValueError(f"CLIP processor config: expected a dict, got {type(cfg).__name__}")
  for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
    if not cfg.get(flag, True):
      raise ValueError(f"CLIP processor config: {flag} = False is not supported")
  if cfg.get("resample", 3) != 3:
    raise ValueError(f"CLIP processor config: resample must be 3 (bicubic), got {cfg['resample']!r}")
  if abs(float(cfg.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
    raise ValueError(f"CLIP processor config: rescale_factor must be 1/255, got " f"{cfg['rescale_factor']!r}")
  crop = cfg.get("crop_size", 224)
  if isinstance(crop, dict):
    if crop.get("height") != crop.get("width"):
      raise ValueError(f"CLIP processor config: crop_size must be square, got {crop!r}")
    crop = crop.get("height")
  size = cfg.get("size", {"shortest_edge": 224})
  shortest = size.get("shortest_edge") if isinstance(size, dict) else size
  for field, value in (("crop_size", crop), ("size.shortest_edge", shortest)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"CLIP processor config: {field} must be a positive int, got {value!r}")
  mean = tuple(float(v) for v in cfg.get("image_mean", CLIP_MEAN))
  std = tuple(float(v) for v in cfg.get("image_std", CLIP_STD))
  if len(mean) != 3 or len(std) != 3:
    raise ValueError(f"CLIP processor config: image_mean / image_std need 3 entries, got " f"{mean!r}, {std!r}")
  return {"crop_size": crop, "shortest_edge": shortest, "mean": mean, "std": std}


_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_LAYER_LEAF = {  # transformers name inside a layer -> our path inside layers_{i}
    "self_attn.q_proj": ("attn", "q"),
    "self_attn.k_proj": ("attn", "k"),
    "self_attn.v_proj": ("attn", "v"),
    "self_attn.out_proj": ("attn", "o"),
    "mlp.fc1": ("fc1",),
    "mlp.fc2": ("fc2",),
    "layer_norm1": ("norm1",),
    "layer_norm2": ("norm2",),
}
_NORMS = {"pre_layrnorm": ("pre_norm",), "post_layernorm": ("post_norm",)}


def _leaf(prefix: tuple[str, ...], kind: str, is_norm: bool) -> weights.Target | None:
  if kind == "weight":
    return weights.Target(prefix + ("scale",)) if is_norm else weights.Target(prefix + ("kernel",), weights.linear)
  if kind == "bias":
    return weights.Target(prefix + ("bias",))
  return None


def layer_target(layer: tuple[str, ...], name: str, kind: str) -> weights.Target | None:
  """Where ``encoder.layers.N.<name>.<kind>`` of a CLIP tower (vision or text) goes, ``layer`` being layer N's path;
  None for a name or kind that a layer does not have."""
  if name not in _LAYER_LEAF:
    return None
  return _leaf(layer + _LAYER_LEAF[name], kind, name.startswith("layer_norm"))


def torch_key_to_target(name: str) -> weights.Target | None:
  """Where one tensor of a transformers ``CLIPVisionModel`` state dict goes in the tower.

  Names may carry the ``vision_model.`` prefix (the published Wan2.1 release, written by
  transformers 4) or not (transformers 5 writes ``embeddings.*``, ``encoder.*`` directly).
  Linear weights ``[out, in]`` become ``[in, out]`` kernels, the patch convolution
  ``[D, C, p, p]`` a ``[p, p, C, D]`` kernel; layers are not scanned (``layer`` is None).

  Returns None (skip) for two names that are not parameters of the tower: the
  ``embeddings.position_ids`` buffer (older transformers saved it) and ``visual_projection.weight``
  (the projection head of ``CLIPVisionModelWithProjection``; Wan uses hidden states).

  Raises:
    ValueError: for any other name, naming the key.
  """
  if name == "visual_projection.weight":
    return None
  key = name[len("vision_model.") :] if name.startswith("vision_model.") else name
  if key == "embeddings.position_ids":
    return None
  if key == "embeddings.class_embedding":
    return weights.Target(("class_embedding",))
  if key == "embeddings.patch_embedding.weight":
    return weights.Target(("patch_embedding",), weights.conv)
  if key == "embeddings.position_embedding.weight":
    return weights.Target(("position_embedding",))
  base, _, kind = key.rpartition(".")
  if base in _NORMS:
    target = _leaf(_NORMS[base], kind, True)
    if target is not None:
      return target
  m = _LAYER.fullmatch(base)
  if m:
    target = layer_target((f"layers_{int(m.group(1))}",), m.group(2), kind)
    if target is not None:
      return target
  raise ValueError(
      f"CLIP vision checkpoint: unknown tensor name {name!r} (expected a "
      "CLIPVisionModel parameter: [vision_model.]embeddings.*, pre_layrnorm.*, "
      "encoder.layers.{i}.*, post_layernorm.*)"
  )
