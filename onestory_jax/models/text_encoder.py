"""T5-style text encoder (the text encoder T of OneStory, arXiv 2512.07802, Eq. 1).

Each caption C_i becomes text tokens t_i = T(C_i) in R^{L x D_t}; the DiT attends to them
through cross-attention, and Frame Selection projects them with phi_T (Eq. 3). Wan2.1 uses
umT5-XXL's encoder (512 tokens, D_t = 4096). This module has the same structure, so the real
weights can later be loaded into it unchanged; the demo runs a small instance of it.

Structure (umT5 encoder):
  x = token_embedding[tokens]
  for each layer:
    x = x + SelfAttention(RMSNorm(x))   # no biases, unscaled logits, per-layer relative
                                        # position bias [num_buckets, heads] (umT5 keeps one
                                        # per layer; T5 v1.1 shares layer 0's)
    x = x + wo(gelu_tanh(wi_0 x) * wi_1 x)  # pre-RMSNorm gated-GELU FFN
  y = RMSNorm(x), zeroed at padded positions (Wan zero-pads text embeddings to a fixed length)

Keys at padded positions are masked out of attention, so outputs at real positions do not
depend on what the padded positions hold.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def relative_position_bucket(relative_position: jax.Array, num_buckets: int,
                             max_distance: int) -> jax.Array:
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
  large = max_exact + (jnp.log(n_f / max_exact) / math.log(max_distance / max_exact)
                       * (half - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, half - 1)
  return bucket + jnp.where(n < max_exact, n, large)


class RMSNorm(nn.Module):
  """T5 layer norm: x / rms(x) * scale, no mean subtraction, no bias; computed in float32."""
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (x.shape[-1],), self.param_dtype)
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
        "kernel", nn.with_logical_partitioning(nn.initializers.normal(self.stddev), self.axes),
        self.shape, self.param_dtype)
    return jnp.einsum(self.equation, x.astype(self.dtype), kernel.astype(self.dtype))


class T5SelfAttention(nn.Module):
  """Multi-head self-attention with T5's relative position bias; no biases, no 1/sqrt(d)."""
  num_heads: int
  rel_buckets: int
  rel_max_distance: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
    _, length, d_model = x.shape
    heads = self.num_heads
    head_dim = d_model // heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def proj(name, std):
      return _Einsum((d_model, heads, head_dim), ("embed", "heads", "kv"), "bld,dhk->blhk", std,
                     name=name, **kw)(x)

    # T5 initialisation: q absorbs the missing 1/sqrt(head_dim) of the unscaled logits.
    q = proj("q", (d_model * head_dim) ** -0.5)
    k = proj("k", d_model ** -0.5)
    v = proj("v", d_model ** -0.5)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    k = nn.with_logical_constraint(k, ("batch", "length", "heads", "kv"))
    v = nn.with_logical_constraint(v, ("batch", "length", "heads", "kv"))

    rel_bias = self.param(
        "relative_attention_bias",
        nn.with_logical_partitioning(nn.initializers.normal(d_model ** -0.5), (None, "heads")),
        (self.rel_buckets, heads), self.param_dtype)
    positions = jnp.arange(length)
    buckets = relative_position_bucket(positions[None, :] - positions[:, None],
                                       self.rel_buckets, self.rel_max_distance)  # [q, k]
    bias = jnp.transpose(rel_bias[buckets], (2, 0, 1)).astype(jnp.float32)  # [heads, q, k]

    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits + bias[None]
    # Large finite negative (not -inf) keeps all-padding rows finite; they are zeroed later.
    logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return _Einsum((heads, head_dim, d_model), ("heads", "kv", "embed"), "blhk,hkd->bld",
                   (heads * head_dim) ** -0.5, name="o", **kw)(out)


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
      return nn.Dense(features, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=nn.with_logical_partitioning(init(std), axes), name=name)

    gate = jax.nn.gelu(dense("wi_0", self.d_ff, d_model ** -0.5, ("embed", "mlp"))(x),
                       approximate=True)
    h = gate * dense("wi_1", self.d_ff, d_model ** -0.5, ("embed", "mlp"))(x)
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    return dense("wo", d_model, self.d_ff ** -0.5, ("mlp", "embed"))(h)


class T5EncoderLayer(nn.Module):
  """Pre-norm residual block: self-attention, then gated-GELU FFN."""
  num_heads: int
  d_ff: int
  rel_buckets: int
  rel_max_distance: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = RMSNorm(name="attn_norm", **kw)(x)
    x = x + T5SelfAttention(self.num_heads, self.rel_buckets, self.rel_max_distance,
                            name="attn", **kw)(h, key_mask)
    h = RMSNorm(name="ffn_norm", **kw)(x)
    x = x + T5GatedFFN(self.d_ff, name="ffn", **kw)(h)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class T5Encoder(nn.Module):
  """umT5-style text encoder: tokens [B, L] int32 -> embeddings [B, L, d_model].

  Attributes:
    vocab_size: rows of ``token_embedding``.
    d_model: model width (4096 for umT5-XXL).
    num_layers: encoder layers (24 for umT5-XXL).
    num_heads: attention heads (64 for umT5-XXL); head width is d_model // num_heads.
    d_ff: gated-FFN width (10240 for umT5-XXL).
    rel_buckets: relative-position buckets (32).
    rel_max_distance: distance where log-spaced buckets saturate (128 for umT5).
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
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    for field in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff"):
      value = getattr(self, field)
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"T5Encoder: {field} must be a positive int, got {value!r}")
    if self.d_model % self.num_heads:
      raise ValueError(f"T5Encoder: d_model = {self.d_model} must be divisible by "
                       f"num_heads = {self.num_heads}")
    if self.rel_buckets < 4 or self.rel_buckets % 2:
      raise ValueError(f"T5Encoder: rel_buckets must be an even int >= 4, got {self.rel_buckets}")
    if self.rel_max_distance <= self.rel_buckets // 4:
      raise ValueError(f"T5Encoder: rel_max_distance = {self.rel_max_distance} must exceed "
                       f"rel_buckets // 4 = {self.rel_buckets // 4}")
    self.token_embedding = self.param(
        "token_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
        (self.vocab_size, self.d_model), self.param_dtype)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.layers = [
        T5EncoderLayer(self.num_heads, self.d_ff, self.rel_buckets, self.rel_max_distance,
                       name=f"layers_{i}", **kw) for i in range(self.num_layers)]
    self.final_norm = RMSNorm(name="final_norm", **kw)

  def __call__(self, tokens: jax.Array, pad_id: int = 0) -> jax.Array:
    """Encodes tokens; outputs at positions where tokens == pad_id are exactly zero."""
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"T5Encoder: tokens must be an int array [B, L], got {tokens.dtype} "
                       f"shape {tuple(tokens.shape)}")
    mask = tokens != pad_id
    x = jnp.take(self.token_embedding, tokens, axis=0).astype(self.dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    for layer in self.layers:
      x = layer(x, mask)
    x = self.final_norm(x)
    return jnp.where(mask[..., None], x, jnp.zeros((), x.dtype))


_TEXT_ENCODERS = ("t5",)


def make_text_encoder(config, vocab_size: int) -> nn.Module:
  """Text encoder named by ``config.text_encoder.name`` ('t5')."""
  te = config.text_encoder
  if te.name == "t5":
    dtype = jnp.dtype(te.get("dtype", config.model.get("dtype", "float32")))
    param_dtype = jnp.dtype(te.get("param_dtype", config.model.get("param_dtype", "float32")))
    return T5Encoder(vocab_size=int(vocab_size), d_model=te.d_model, num_layers=te.num_layers,
                     num_heads=te.num_heads, d_ff=te.d_ff, rel_buckets=te.rel_buckets,
                     rel_max_distance=te.rel_max_distance, dtype=dtype, param_dtype=param_dtype)
  raise ValueError(f"config.text_encoder.name: unknown text encoder {te.name!r}; available: "
                   f"{', '.join(_TEXT_ENCODERS)}")


def text_dim(config) -> int:
  """Width D_t of the text tokens (d_model)."""
  te = config.text_encoder
  if te.name not in _TEXT_ENCODERS:
    raise ValueError(f"config.text_encoder.name: unknown text encoder {te.name!r}; available: "
                     f"{', '.join(_TEXT_ENCODERS)}")
  return int(te.d_model)
