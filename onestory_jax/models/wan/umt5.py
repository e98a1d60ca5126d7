"""T5-style text encoder (the text encoder T of OneStory, arXiv 2512.07802, Eq. 1).

Each caption C_i becomes text tokens t_i = T(C_i) in R^{L x D_t}; the DiT attends to them
through cross-attention, and Frame Selection projects them with phi_T (Eq. 3). Wan2.1 uses
umT5-XXL's encoder (512 tokens, D_t = 4096). :class:`T5Encoder` computes the same function as
transformers' ``UMT5EncoderModel`` (modeling_umt5.py): the demo runs a small instance of it
(``config.text_encoder.name = 't5'``), real configs load the published umT5 weights into it
(``name = 'umt5'``) through :func:`umt5_torch_key_to_target` (bound to a release's config by
:func:`umt5_key_map_from_transformers`; :func:`umt5_abstract_params_from_transformers` gives the
matching abstract parameter tree).

Structure (umT5 encoder):
  x = token_embedding[tokens]
  for each layer:
    x = x + SelfAttention(RMSNorm(x))   # no biases, unscaled logits, per-layer relative
                                        # position bias [num_buckets, heads] (umT5 keeps one
                                        # per layer; T5 v1.1 shares layer 0's)
    x = x + wo(gelu_tanh(wi_0 x) * wi_1 x)  # pre-RMSNorm gated-GELU FFN
  y = RMSNorm(x), zeroed at padded positions (Wan zero-pads text embeddings to a fixed length)

Keys at padded positions are masked out of attention, so outputs at real positions do not
depend on what the padded positions hold. This is how Wan's pipelines use umT5 (diffusers'
``WanImageToVideoPipeline._get_t5_prompt_embeds``): the encoder runs with the tokenizer's
attention mask, then each prompt's last hidden state is cut to its real length and zero-padded
back to 512 tokens. Zeroing the padded rows gives exactly that tensor.

The head width (umT5's ``d_kv``) may differ from ``d_model // num_heads`` (umT5-small: 6 heads
of 64 on a width of 512); the demo leaves it at ``d_model // num_heads``.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from onestory_jax import sharding
from onestory_jax import weights

Dtype = Any


def relative_position_bucket(relative_position: jax.Array, num_buckets: int, max_distance: int) -> jax.Array:
  """Bidirectional T5 bucket of ``relative_position = key_pos - query_pos``.

  Half of the buckets are for keys after the query (positive offsets), half for keys at or
  before it. Within a half, distances below ``num_buckets // 4`` get their own bucket; larger
  distances share log-spaced buckets up to ``max_distance``, beyond which they all fall in the
  last bucket of the half.

  Args:
    relative_position: int array of key - query offsets.
    num_buckets: total number of buckets (even, >= 4).
    max_distance: distance at which the log-spaced buckets saturate.

  Returns:
    int32 array of the same shape, values in [0, num_buckets).
  """
  half = num_buckets // 2
  rel = jnp.asarray(relative_position, jnp.int32)
  bucket = jnp.where(rel > 0, half, 0)
  n = jnp.abs(rel)
  max_exact = half // 2
  # log-spaced buckets for n >= max_exact; jnp.maximum keeps log() finite where unused.
  n_f = jnp.maximum(n, max_exact).astype(jnp.float32)
  large = max_exact + (jnp.log(n_f / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)).astype(
      jnp.int32
  )
  large = jnp.minimum(large, half - 1)
  return bucket + jnp.where(n < max_exact, n, large)


class RMSNorm(nn.Module):
  """T5 layer norm: x / rms(x) * scale, no mean subtraction, no bias; computed in float32.

  (``UMT5LayerNorm``: the mean of squares is taken in float32 and epsilon added inside the root.)
  """

  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (x.shape[-1],), self.param_dtype
    )
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


class _Einsum(nn.Module):
  """A bias-free linear map with a multi-axis kernel: einsum(equation, x, kernel).

  (flax's DenseGeneral initialises multi-axis kernels through a flattened 2-D array, which
  breaks logical sharding constraints under a mesh; an explicit kernel avoids that.)
  """

  shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  equation: str
  stddev: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(nn.initializers.normal(self.stddev), self.axes),
        self.shape,
        self.param_dtype,
    )
    return jnp.einsum(self.equation, x.astype(self.dtype), kernel.astype(self.dtype))


class T5SelfAttention(nn.Module):
  """Multi-head self-attention with T5's relative position bias; no biases, no 1/sqrt(d).

  ``head_dim`` is umT5's ``d_kv``; ``None`` means ``d_model // num_heads``.
  """

  num_heads: int
  rel_buckets: int
  rel_max_distance: int
  head_dim: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
    _, length, d_model = x.shape
    heads = self.num_heads
    head_dim = self.head_dim or d_model // heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def proj(name, std):
      return _Einsum((d_model, heads, head_dim), ("embed", "heads", "kv"), "bld,dhk->blhk", std, name=name, **kw)(x)

    # T5 initialisation: q absorbs the missing 1/sqrt(head_dim) of the unscaled logits.
    q = proj("q", (d_model * head_dim) ** -0.5)
    k = proj("k", d_model**-0.5)
    v = proj("v", d_model**-0.5)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    k = nn.with_logical_constraint(k, ("batch", "length", "heads", "kv"))
    v = nn.with_logical_constraint(v, ("batch", "length", "heads", "kv"))

    rel_bias = self.param(
        "relative_attention_bias",
        nn.with_logical_partitioning(nn.initializers.normal(d_model**-0.5), (None, "heads")),
        (self.rel_buckets, heads),
        self.param_dtype,
    )
    positions = jnp.arange(length)
    buckets = relative_position_bucket(
        positions[None, :] - positions[:, None], self.rel_buckets, self.rel_max_distance
    )  # [q, k]
    bias = jnp.transpose(rel_bias[buckets], (2, 0, 1)).astype(jnp.float32)  # [heads, q, k]

    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits + bias[None]
    # Large finite negative (not -inf) keeps all-padding rows finite; they are zeroed later.
    logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return _Einsum(
        (heads, head_dim, d_model),
        ("heads", "kv", "embed"),
        "blhk,hkd->bld",
        (heads * head_dim) ** -0.5,
        name="o",
        **kw,
    )(out)


class T5GatedFFN(nn.Module):
  """wo(gelu_tanh(wi_0 x) * wi_1 x), no biases."""

  d_ff: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d_model = x.shape[-1]
    init = nn.initializers.normal

    def dense(name, features, std, axes):
      return nn.Dense(
          features,
          use_bias=False,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          kernel_init=nn.with_logical_partitioning(init(std), axes),
          name=name,
      )

    gate = jax.nn.gelu(dense("wi_0", self.d_ff, d_model**-0.5, ("embed", "mlp"))(x), approximate=True)
    h = gate * dense("wi_1", self.d_ff, d_model**-0.5, ("embed", "mlp"))(x)
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    return dense("wo", d_model, self.d_ff**-0.5, ("mlp", "embed"))(h)


class T5EncoderLayer(nn.Module):
  """Pre-norm residual block: self-attention, then gated-GELU FFN."""

  num_heads: int
  d_ff: int
  rel_buckets: int
  rel_max_distance: int
  head_dim: int | None = None
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = RMSNorm(eps=self.eps, name="attn_norm", **kw)(x)
    x = x + T5SelfAttention(self.num_heads, self.rel_buckets, self.rel_max_distance, self.head_dim, name="attn", **kw)(
        h, key_mask
    )
    h = RMSNorm(eps=self.eps, name="ffn_norm", **kw)(x)
    x = x + T5GatedFFN(self.d_ff, name="ffn", **kw)(h)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class T5Encoder(nn.Module):
  """umT5-style text encoder: tokens [B, L] int32 -> embeddings [B, L, d_model].

  Attributes:
    vocab_size: rows of ``token_embedding``.
    d_model: model width (4096 for umT5-XXL).
    num_layers: encoder layers (24 for umT5-XXL).
    num_heads: attention heads (64 for umT5-XXL).
    d_ff: gated-FFN width (10240 for umT5-XXL).
    rel_buckets: relative-position buckets (32).
    rel_max_distance: distance where log-spaced buckets saturate (128 for umT5).
    head_dim: width of each head (umT5's ``d_kv``, 64 for umT5-XXL); ``None`` means
      ``d_model // num_heads`` (the demo).
    eps: epsilon of the RMS norms (umT5's ``layer_norm_epsilon``, 1e-6).
    dtype: compute dtype (norms and softmax run in float32).
    param_dtype: parameter dtype.
  """

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  d_ff: int
  rel_buckets: int = 32
  rel_max_distance: int = 128
  head_dim: int | None = None
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    for field in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff"):
      value = getattr(self, field)
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"T5Encoder: {field} must be a positive int, got {value!r}")
    if self.head_dim is None:
      if self.d_model % self.num_heads:
        raise ValueError(
            f"T5Encoder: d_model = {self.d_model} must be divisible by "
            f"num_heads = {self.num_heads} (or set head_dim)"
        )
    elif not isinstance(self.head_dim, (int, np.integer)) or self.head_dim < 1:
      raise ValueError(f"T5Encoder: head_dim must be a positive int or None, got {self.head_dim!r}")
    if not self.eps > 0:
      raise ValueError(f"T5Encoder: eps must be > 0, got {self.eps!r}")
    if self.rel_buckets < 4 or self.rel_buckets % 2:
      raise ValueError(f"T5Encoder: rel_buckets must be an even int >= 4, got {self.rel_buckets}")
    if self.rel_max_distance <= self.rel_buckets // 4:
      raise ValueError(
          f"T5Encoder: rel_max_distance = {self.rel_max_distance} must exceed "
          f"rel_buckets // 4 = {self.rel_buckets // 4}"
      )
    self.token_embedding = self.param(
        "token_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
        (self.vocab_size, self.d_model),
        self.param_dtype,
    )
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.layers = [
        T5EncoderLayer(
            self.num_heads,
            self.d_ff,
            self.rel_buckets,
            self.rel_max_distance,
            self.head_dim,
            self.eps,
            name=f"layers_{i}",
            **kw,
        )
        for i in range(self.num_layers)
    ]
    self.final_norm = RMSNorm(eps=self.eps, name="final_norm", **kw)

  def __call__(self, tokens: jax.Array, pad_id: int = 0, mask: jax.Array | None = None) -> jax.Array:
    """Encodes tokens; outputs at padded positions are exactly zero.

    Args:
      tokens: int [B, L] token ids.
      pad_id: the padding id; positions holding it are padding when ``mask`` is None.
      mask: optional bool [B, L], True at real tokens (the tokenizer's attention mask). It
        overrides ``tokens != pad_id``; the two agree unless a prompt spells out the pad token.

    Returns:
      [B, L, d_model] last hidden states, zero where the mask is False.
    """
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(
          f"T5Encoder: tokens must be an int array [B, L], got {tokens.dtype} " f"shape {tuple(tokens.shape)}"
      )
    if mask is None:
      mask = tokens != pad_id
    elif tuple(mask.shape) != tuple(tokens.shape):
      raise ValueError(
          f"T5Encoder: mask must have the tokens' shape {tuple(tokens.shape)}, got " f"{tuple(mask.shape)}"
      )
    else:
      mask = mask.astype(bool)
    x = jnp.take(self.token_embedding, tokens, axis=0).astype(self.dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    for layer in self.layers:
      x = layer(x, mask)
    x = self.final_norm(x)
    return jnp.where(mask[..., None], x, jnp.zeros((), x.dtype))


_TEXT_ENCODERS = ("t5", "umt5")


def _dtypes(config) -> tuple[Any, Any]:
  te = config.text_encoder
  dtype = jnp.dtype(te.get("dtype", config.model.get("dtype", "float32")))
  param_dtype = jnp.dtype(te.get("param_dtype", config.model.get("param_dtype", "float32")))
  return dtype, param_dtype


def _unknown(name: str) -> ValueError:
  return ValueError(
      f"config.text_encoder.name: unknown text encoder {name!r}; available: " f"{', '.join(_TEXT_ENCODERS)}"
  )


def make_text_encoder(config, vocab_size: int) -> nn.Module:
  """Text encoder named by ``config.text_encoder.name``.

  ``'t5'`` (demo): a small encoder over the word-level StoryWorld tokenizer; its embedding has
  ``vocab_size`` rows (the tokenizer's size). Fields: d_model, num_layers, num_heads, d_ff,
  rel_buckets, rel_max_distance.

  ``'umt5'`` (Wan2.1 / Wan2.2 configs): the published umT5 encoder, loaded by the converter
  through :func:`umt5_torch_key_to_target`. Fields of ``config.text_encoder`` (the values of
  umT5-XXL in brackets; :func:`config_from_transformers` reads them from the release's
  ``text_encoder/config.json``):

  * ``vocab_size`` (256384): rows of the embedding; must be >= the tokenizer's size, which is
    what the ``vocab_size`` argument receives;
  * ``d_model`` (4096), ``d_kv`` (64), ``d_ff`` (10240), ``num_layers`` (24),
    ``num_heads`` (64), ``rel_buckets`` (32), ``rel_max_distance`` (128), ``eps`` (1e-6);
  * ``text_len`` (512): prompt length; Wan pads every prompt to 512 tokens (read by the
    tokenizer, :func:`onestory_jax.data.tokenizer.load_umt5_tokenizer`, and the data config);
  * ``tokenizer``: path of the release's ``tokenizer/`` directory (or its ``tokenizer.json``);
  * optional ``dtype`` / ``param_dtype`` (default: ``config.model``'s).
  """
  te = config.text_encoder
  dtype, param_dtype = _dtypes(config)
  if te.name == "t5":
    return T5Encoder(
        vocab_size=int(vocab_size),
        d_model=te.d_model,
        num_layers=te.num_layers,
        num_heads=te.num_heads,
        d_ff=te.d_ff,
        rel_buckets=te.rel_buckets,
        rel_max_distance=te.rel_max_distance,
        dtype=dtype,
        param_dtype=param_dtype,
    )
  if te.name == "umt5":
    sizes = {}
    for field in _UMT5_FIELDS:
      if field not in te:
        raise ValueError(f"config.text_encoder.{field} is required for the 'umt5' text encoder")
      sizes[field] = int(te[field])
    if int(vocab_size) > sizes["vocab_size"]:
      raise ValueError(
          f"config.text_encoder.vocab_size = {sizes['vocab_size']} is smaller than the "
          f"tokenizer's vocabulary ({int(vocab_size)} ids)"
      )
    return umt5_encoder(dict(sizes, eps=float(te.get("eps", 1e-6))), dtype=dtype, param_dtype=param_dtype)
  raise _unknown(te.name)


def umt5_encoder(sizes: dict, **kw: Any) -> T5Encoder:
  """The :class:`T5Encoder` of umT5 sizes (the ``_UMT5_FIELDS`` keys and ``eps``); ``kw``: dtypes."""
  return T5Encoder(
      vocab_size=sizes["vocab_size"],
      d_model=sizes["d_model"],
      num_layers=sizes["num_layers"],
      num_heads=sizes["num_heads"],
      d_ff=sizes["d_ff"],
      rel_buckets=sizes["rel_buckets"],
      rel_max_distance=sizes["rel_max_distance"],
      head_dim=sizes["d_kv"],
      eps=sizes["eps"],
      **kw,
  )


def text_dim(config) -> int:
  """Width D_t of the text tokens (d_model)."""
  te = config.text_encoder
  if te.name not in _TEXT_ENCODERS:
    raise _unknown(te.name)
  return int(te.d_model)


# ---------------------------------------------------------------------------- published weights
_UMT5_FIELDS = {  # our config field -> transformers UMT5Config field
    "vocab_size": "vocab_size",
    "d_model": "d_model",
    "d_kv": "d_kv",
    "d_ff": "d_ff",
    "num_layers": "num_layers",
    "num_heads": "num_heads",
    "rel_buckets": "relative_attention_num_buckets",
    "rel_max_distance": "relative_attention_max_distance",
}
# Gated activations of the FFN that equal gelu(approximate=True), the one T5GatedFFN computes.
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def config_from_transformers(cfg: dict) -> dict:
  """Sizes of ``config.text_encoder`` (name 'umt5') from a transformers ``UMT5Config`` dict.

  Args:
    cfg: the parsed ``text_encoder/config.json`` of a release (``model_type`` 'umt5', a gated
      tanh-GELU FFN, as umT5 has).

  Returns:
    ``{'name': 'umt5', 'vocab_size', 'd_model', 'd_kv', 'd_ff', 'num_layers', 'num_heads',
    'rel_buckets', 'rel_max_distance', 'eps'}``.

  Raises:
    ValueError: a field is missing, or the config describes a model this port does not compute
      (not umT5, or another FFN activation).
  """
  if not isinstance(cfg, dict):
    raise ValueError(f"umT5 config: expected a dict (config.json), got {type(cfg).__name__}")
  if cfg.get("model_type") != "umt5":
    raise ValueError(
        f"umT5 config: model_type must be 'umt5', got {cfg.get('model_type')!r} "
        "(T5 v1.1 shares one relative bias across layers; only umT5 is ported)"
    )
  out: dict[str, Any] = {"name": "umt5", **weights.positive_int_fields(cfg, _UMT5_FIELDS, "umT5 config")}
  out["eps"] = float(cfg.get("layer_norm_epsilon", 1e-6))
  ffn = cfg.get("feed_forward_proj", "gated-gelu")
  act = cfg.get("dense_act_fn", "gelu_new")
  if not str(ffn).startswith("gated-") or act not in _TANH_GELUS:
    raise ValueError(
        f"umT5 config: feed_forward_proj = {ffn!r}, dense_act_fn = {act!r}; this port "
        f"computes the gated tanh-GELU FFN ('gated-gelu' with one of {_TANH_GELUS})"
    )
  return out


def _heads_in(x: np.ndarray, num_heads: int, name: str) -> np.ndarray:
  """Torch q/k/v weight [heads * d_kv, d_model] -> our kernel [d_model, heads, d_kv]."""
  if x.ndim != 2 or x.shape[0] % num_heads:
    raise ValueError(
        f"{name}: expected [num_heads * d_kv, d_model] with num_heads = {num_heads}, " f"got shape {x.shape}"
    )
  return np.ascontiguousarray(x.T.reshape(x.shape[1], num_heads, x.shape[0] // num_heads))


def _heads_out(x: np.ndarray, num_heads: int, name: str) -> np.ndarray:
  """Torch o weight [d_model, heads * d_kv] -> our kernel [heads, d_kv, d_model]."""
  if x.ndim != 2 or x.shape[1] % num_heads:
    raise ValueError(
        f"{name}: expected [d_model, num_heads * d_kv] with num_heads = {num_heads}, " f"got shape {x.shape}"
    )
  return np.ascontiguousarray(x.T.reshape(num_heads, x.shape[1] // num_heads, x.shape[0]))


_UMT5_BLOCK = re.compile(r"encoder\.block\.(\d+)\.layer\.([01])\.(.+)\.weight")
_UMT5_LEAF = {  # (sub-layer, rest of the name) -> our path inside layers_{i}
    ("0", "SelfAttention.relative_attention_bias"): ("attn", "relative_attention_bias"),
    ("0", "layer_norm"): ("attn_norm", "scale"),
    ("1", "DenseReluDense.wi_0"): ("ffn", "wi_0", "kernel"),
    ("1", "DenseReluDense.wi_1"): ("ffn", "wi_1", "kernel"),
    ("1", "DenseReluDense.wo"): ("ffn", "wo", "kernel"),
    ("1", "layer_norm"): ("ffn_norm", "scale"),
}


def umt5_torch_key_to_target(name: str, *, num_heads: int) -> weights.Target | None:
  """Where one tensor of a transformers ``UMT5EncoderModel`` state dict goes in :class:`T5Encoder`.

  ``shared.weight`` is the token embedding. ``encoder.embed_tokens.weight`` is the same tensor,
  tied; transformers saves only ``shared.weight``, and the name returns None (skipped) so that a
  file holding both does not fill ``token_embedding`` twice. Projections ``[out, in]`` become
  ``[in, out]`` kernels; q/k/v split their output axis into ``(num_heads, d_kv)``, o its input
  axis (our kernels keep a heads axis, which the demo's checkpoints have). Layers are not scanned
  (``layer`` is None). :func:`umt5_key_map_from_transformers` binds ``num_heads`` from a config.

  Args:
    name: the tensor's name, e.g. ``encoder.block.3.layer.0.SelfAttention.q.weight``.
    num_heads: the model's head count (``num_heads`` of its config.json), needed to split the
      fused q/k/v/o projections.

  Raises:
    ValueError: for any name that is not a UMT5EncoderModel parameter (decoder weights, the LM
      head, a non-gated FFN's ``wi``), naming the key.
  """
  if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
    raise ValueError(f"umt5_torch_key_to_target: num_heads must be a positive int, got {num_heads!r}")
  if name == "encoder.embed_tokens.weight":
    return None
  if name == "shared.weight":
    return weights.Target(("token_embedding",))
  if name == "encoder.final_layer_norm.weight":
    return weights.Target(("final_norm", "scale"))
  m = _UMT5_BLOCK.fullmatch(name)
  if m:
    layer, sub, rest = f"layers_{int(m.group(1))}", m.group(2), m.group(3)
    if sub == "0" and rest in ("SelfAttention.q", "SelfAttention.k", "SelfAttention.v"):
      return weights.Target((layer, "attn", rest[-1], "kernel"), lambda x: _heads_in(x, num_heads, name))
    if sub == "0" and rest == "SelfAttention.o":
      return weights.Target((layer, "attn", "o", "kernel"), lambda x: _heads_out(x, num_heads, name))
    leaf = _UMT5_LEAF.get((sub, rest))
    if leaf is not None:
      transform = weights.linear if leaf[-1] == "kernel" else weights.identity
      return weights.Target((layer,) + leaf, transform)
  raise ValueError(
      f"umT5 checkpoint: unknown tensor name {name!r} (expected a UMT5EncoderModel "
      "parameter: shared / encoder.embed_tokens, encoder.block.{i}.layer.{0,1}.*, "
      "encoder.final_layer_norm)"
  )


def umt5_key_map_from_transformers(cfg: dict) -> Callable[[str], weights.Target | None]:
  """The converter's key map for a release's ``text_encoder/``.

  :func:`umt5_torch_key_to_target` with ``num_heads`` read from the release's config.json (checked
  by :func:`config_from_transformers`).
  """
  return functools.partial(umt5_torch_key_to_target, num_heads=config_from_transformers(cfg)["num_heads"])


def umt5_abstract_params_from_transformers(cfg: dict, *, boxed: bool = False, param_dtype: Any = jnp.float32) -> Any:
  """Abstract parameter tree of the :class:`T5Encoder` that a umT5 config.json describes.

  Leaves are ``jax.ShapeDtypeStruct`` (nothing is allocated); with ``boxed``, Flax's
  logical-partitioning boxes are kept (for sharding rules).
  """
  module = umt5_encoder(config_from_transformers(cfg), param_dtype=param_dtype)
  params = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]
  return params if boxed else sharding.strip_boxes(params)
