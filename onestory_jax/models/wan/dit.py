"""The Wan2.1 video diffusion transformer (DiT) in Flax Linen, with OneStory context tokens.

Semantics follow the Wan2.1 DiT as published in diffusers' ``WanTransformer3DModel``; the
module tree and parameter names mirror diffusers' (``.`` becomes ``_``; Flax leaf names
``kernel`` / ``bias`` / ``scale``) so that released checkpoints can be loaded into it.
Data are channels-last: latents ``[B, F, H, W, C]``.

Forward pass (one shot):

1. ``patch_embedding``: a Conv3d with kernel = stride = patch, written as a patchify reshape
   plus one einsum; tokens in (f, h, w) raster order.
2. ``condition_embedder``: sinusoidal timestep features -> ``temb`` (time MLP) ->
   ``timestep_proj`` = Linear(SiLU(temb)) giving 6 modulation vectors per sample; caption
   tokens through a GELU(tanh) MLP; for I2V, CLIP image tokens through LN-MLP-LN.
3. ``blocks_i``: adaLN-modulated self-attention with 3D RoPE (``rope.py``) and RMS q/k norms,
   cross-attention to text (+ decoupled image cross-attention for I2V), modulated GELU FFN.
4. Head: adaLN with ``temb`` then ``proj_out`` and unpatchify.

OneStory (arXiv 2512.07802, Sec. 4.3, Eq. 8) conditions the next shot by token
concatenation ``X = concat([N, C])``: the noise tokens N of the current shot are followed by
context tokens C produced by the Adaptive Conditioner (Eq. 7) from the selected memory
frames. Here the context tokens arrive already embedded to ``dim`` with float RoPE positions,
a key-padding mask and their own timestep (clean, t = 0, by default). They join
self-attention (masked where padded) and the text/image cross-attention, are modulated with
their own timestep, and are dropped before the head. Without context the model is exactly
Wan2.1.

Variants (all computed by the one module): Wan2.1-T2V (no image branch), Wan2.1-I2V (``image_dim``
set: CLIP tokens through ``image_embedder`` and the ``add_k_proj``/``add_v_proj`` image
cross-attention; the I2V input channels are [noise, mask, first-frame latent]) and Wan2.2-TI2V
(no image branch; the pipeline passes one timestep per noise token, ``[B, N]``, with t = 0 on the
first-frame tokens, and every block and the head are then modulated token by token).

Published weights: :func:`torch_key_to_target` maps every tensor of a diffusers
``WanTransformer3DModel`` state dict onto this module's parameters (unrolled ``blocks_i`` or the
stacked ``blocks`` of ``scan_layers``), :func:`config_from_diffusers` reads the sizes from the
release's ``config.json``; ``onestory_jax.convert`` streams a release through them.
tests/test_parity_wan_dit.py checks the outputs against diffusers in float32 (relative error
<= 1e-5, timesteps up to 1000) and states the bfloat16 error.
"""

from __future__ import annotations

import math
import re
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from onestory_jax import weights
from onestory_jax.models import attention as attention_lib
from onestory_jax.models import layers
from onestory_jax.models.wan import rope

Array = jax.Array
Dtype = Any

BLD = ("batch", "length", "embed")
BLHD = ("batch", "length", "heads", "kv")
BLH = ("batch", "length", "heads")  # attention output, heads x head_dim flattened
BLM = ("batch", "length", "mlp")  # feed-forward hidden
CROSS_KV = ("batch", None, "heads", "kv")  # text / image keys: short sequences, kept whole on every device
REMAT_POLICIES = ("none", "full", "dots")

_zeros = nn.initializers.zeros_init()
_ones = nn.initializers.ones_init()


def _as_dtype(d: Dtype, field: str) -> jnp.dtype:
  try:
    return jnp.dtype(d)
  except TypeError as e:
    raise ValueError(f"model.{field}: expected a dtype name such as 'float32' or 'bfloat16'; got {d!r}") from e


def _triple(patch: Any, field: str = "patch_size") -> tuple[int, int, int]:
  p = tuple(int(v) for v in patch)
  if len(p) != 3 or min(p) < 1:
    raise ValueError(f"{field}: expected three positive ints (pt, ph, pw); got {patch!r}")
  return p


# ----------------------------------------------------------------------------- pure helpers


def patchify(x: Array, patch: tuple[int, int, int]) -> Array:
  """``[B, F, H, W, C]`` -> ``[B, N, pt*ph*pw*C]``; tokens in (f, h, w) raster order.

  Each token's features are ordered (pt, ph, pw, c), the layout of both the patch-embedding
  kernel and ``proj_out``.
  """
  pt, ph, pw = _triple(patch, "patchify: patch")
  if x.ndim != 5:
    raise ValueError(f"patchify: x must have shape [B, F, H, W, C]; got {x.shape}")
  _, f, h, w, _ = x.shape
  if f % pt or h % ph or w % pw:
    raise ValueError(f"patchify: (F, H, W) = {(f, h, w)} must be divisible by patch {(pt, ph, pw)}")
  return einops.rearrange(x, "b (f pt) (h ph) (w pw) c -> b (f h w) (pt ph pw c)", pt=pt, ph=ph, pw=pw)


def unpatchify(tokens: Array, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> Array:
  """Inverse of :func:`patchify`: ``[B, f*h*w, pt*ph*pw*C]`` -> ``[B, f*pt, h*ph, w*pw, C]``."""
  pt, ph, pw = _triple(patch, "unpatchify: patch")
  f, h, w = grid
  if tokens.ndim != 3 or tokens.shape[1] != f * h * w or tokens.shape[2] % (pt * ph * pw):
    raise ValueError(
        f"unpatchify: tokens must have shape [B, {f * h * w}, pt*ph*pw*C] for grid {grid} and "
        f"patch {(pt, ph, pw)}; got {tokens.shape}"
    )
  return einops.rearrange(
      tokens, "b (f h w) (pt ph pw c) -> b (f pt) (h ph) (w pw) c", f=f, h=h, w=w, pt=pt, ph=ph, pw=pw
  )


def timestep_frequencies(dim: int, max_period: float = 10000.0) -> np.ndarray:
  """The ``dim // 2`` frequencies of :func:`timestep_embedding`, float32, as diffusers' ``get_timestep_embedding``.

  ``exp(-ln(max_period) * arange(dim // 2) / (dim // 2))`` (no frequency shift), evaluated in numpy, where the
  reference's float32 steps are reproduced one by one: ``-ln(max_period)`` rounded to float32, times the float32
  ``arange``, divided by ``dim // 2``, each rounded to float32; the exponential in float64, rounded once. XLA's
  float32 ``exp`` is off by one ulp in most entries, which at t = 999 alone puts the DiT beyond the parity bound.
  PyTorch's CPU ``exp`` is 1-ulp accurate rather than correctly rounded, so some widths keep a few one-ulp
  differences from the reference (one entry of 22 and of 26 dims, 3 of the 128 of Wan's ``freq_dim`` 256; none at
  8, 16, 24 or 32).
  """
  half = dim // 2
  exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
  exponent = (exponent / np.float32(half)).astype(np.float32)
  return np.exp(exponent.astype(np.float64)).astype(np.float32)


def timestep_embedding(t: Array, dim: int, max_period: float = 10000.0) -> Array:
  """Sinusoidal features of timesteps ``t`` [B] -> ``[B, dim]`` float32, ordered [cos, sin].

  ``args = t * freqs`` in float32 with the constant table of :func:`timestep_frequencies`.
  """
  if dim % 2:
    raise ValueError(f"timestep_embedding: dim (freq_dim) must be even; got {dim}")
  freqs = jnp.asarray(timestep_frequencies(dim, max_period))
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def attention(
    q: Array,
    k: Array,
    v: Array,
    key_mask: Array | None = None,
    backend: str = "auto",
    *,
    kv_lengths: Array | None = None,
    kv_follows_q: bool = True,
) -> Array:
  """Scaled dot-product attention, ``q`` [B, Lq, H, D], ``k``/``v`` [B, Lk, H, D].

  The one place the DiT calls attention: :func:`attention_lib.dot_product_attention` picks the kernel from the
  backend registry (``config.model.attention``) and, under a mesh, shards it (context parallelism for
  self-attention when the token sequence is split over the ``context`` mesh axis).

  Args:
    key_mask: optional ``[B, Lk]`` bool, False = padding key (ignored by every query).
    backend: 'xla' | 'blocked' | 'cudnn' | 'splash' | 'auto' (:func:`attention_lib.backend_names`).
    kv_lengths: optional ``[B]``; keys at positions ``>= kv_lengths[b]`` are padding.
    kv_follows_q: True for self-attention (k/v share the query's token sequence and its sharding).
  """
  return attention_lib.dot_product_attention(q, k, v, key_mask, kv_lengths, backend=backend, kv_follows_q=kv_follows_q)


def _rms_norm(eps: float, param_dtype: Dtype, name: str) -> nn.RMSNorm:
  """RMSNorm over the full projected width (across heads), computed in float32."""
  return nn.RMSNorm(
      epsilon=eps,
      dtype=jnp.float32,
      param_dtype=param_dtype,
      name=name,
      scale_init=nn.with_logical_partitioning(_ones, ("heads",)),
  )


# ----------------------------------------------------------------------------- submodules


def _buffer(x: Array) -> Array:
  """``x`` itself, through a conditional: XLA fuses nothing into a conditional's operand or out of its result, so
  ``x`` is stored as a buffer. (JAX drops a conditional whose branches return their operand unchanged, and XLA:CPU
  removes optimization barriers before fusion, so neither does this.)"""
  return jax.lax.cond(jnp.isnan(x.reshape(-1)[0]), lambda v: v * jnp.asarray(1, v.dtype), lambda v: v, x)


@jax.custom_vjp
def _stored(x: Array) -> Array:
  """Identity whose value and cotangent are stored buffers (see ``WanTransformer3D._blocks``)."""
  return _buffer(x)


def _stored_fwd(x):
  return _buffer(x), None


def _stored_bwd(_, g):
  return (_buffer(g),)


_stored.defvjp(_stored_fwd, _stored_bwd)


class PatchEmbed(nn.Module):
  """Conv3d with kernel = stride = patch, as patchify + einsum; kernel ``(pt, ph, pw, C_in, dim)``."""

  dim: int
  patch: tuple[int, int, int]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    pt, ph, pw = self.patch
    c_in = x.shape[-1]
    kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(
            nn.initializers.xavier_uniform(in_axis=(0, 1, 2, 3), out_axis=4), (None, None, None, "conv_in", "embed")
        ),
        (pt, ph, pw, c_in, self.dim),
        self.param_dtype,
    )
    bias = self.param("bias", nn.with_logical_partitioning(_zeros, ("embed",)), (self.dim,), self.param_dtype)
    tokens = patchify(x.astype(self.dtype), self.patch)
    out = jnp.einsum("bnk,kd->bnd", tokens, kernel.reshape(-1, self.dim).astype(self.dtype))
    return out + bias.astype(self.dtype)


class TwoLayerMLP(nn.Module):
  """``linear_2(act(linear_1(x)))``: diffusers' TimestepEmbedding / PixArtAlphaTextProjection."""

  hidden: int
  features: int
  activation: str  # 'silu' | 'gelu_tanh'
  init_std: float = 0.02
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    init = nn.initializers.normal(self.init_std)
    x = layers.dense(self.hidden, (None, "mlp"), "linear_1", self.dtype, self.param_dtype, init)(x)
    x = nn.silu(x) if self.activation == "silu" else nn.gelu(x, approximate=True)
    return layers.dense(self.features, ("mlp", "embed"), "linear_2", self.dtype, self.param_dtype, init)(x)


class GeluProj(nn.Module):
  """diffusers' ``GELU`` activation module: ``gelu(proj(x))``."""

  features: int
  approximate: bool
  in_axis: str | None = "embed"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  activation_axes: tuple[str | None, ...] | None = None  # logical sharding of the output, if constrained

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = layers.dense(self.features, (self.in_axis, "mlp"), "proj", self.dtype, self.param_dtype)(x)
    if self.activation_axes is not None:
      x = nn.with_logical_constraint(x, self.activation_axes)
    return nn.gelu(x, approximate=self.approximate)


class FeedForward(nn.Module):
  """diffusers' FeedForward: ``net_2(gelu(net_0.proj(x)))`` (net_1 is dropout, absent here)."""

  hidden: int
  features: int
  approximate: bool
  in_axis: str | None = "embed"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  activation_axes: tuple[str | None, ...] | None = None  # logical sharding of the hidden activation

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = GeluProj(
        self.hidden, self.approximate, self.in_axis, self.dtype, self.param_dtype, self.activation_axes, name="net_0"
    )(x)
    return layers.dense(self.features, ("mlp", "embed"), "net_2", self.dtype, self.param_dtype)(x)


class ImageEmbedder(nn.Module):
  """I2V image tokens: LayerNorm -> FeedForward(mult 1, exact GELU) -> LayerNorm (eps 1e-5)."""

  dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image: Array) -> Array:
    x = layers.layer_norm(1e-5, param_dtype=self.param_dtype, axis=None, name="norm1")(image).astype(self.dtype)
    x = FeedForward(image.shape[-1], self.dim, False, None, self.dtype, self.param_dtype, name="ff")(x)
    return layers.layer_norm(1e-5, param_dtype=self.param_dtype, name="norm2")(x).astype(self.dtype)


class ConditionEmbedder(nn.Module):
  """Timestep, text and (I2V) image embeddings.

  Returns ``(temb [T, dim], timestep_proj [T, 6, dim], text [B, Lt, dim], image or None)``,
  the timestep parts in float32 (modulation is precision sensitive).
  """

  dim: int
  freq_dim: int
  has_image: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, timestep: Array, text: Array, image: Array | None):
    t_feat = timestep_embedding(timestep, self.freq_dim)
    temb = TwoLayerMLP(
        self.dim, self.dim, "silu", dtype=jnp.float32, param_dtype=self.param_dtype, name="time_embedder"
    )(t_feat)
    t_proj = layers.dense(6 * self.dim, ("embed", "mlp"), "time_proj", jnp.float32, self.param_dtype)(nn.silu(temb))
    t_proj = t_proj.reshape(t_proj.shape[0], 6, self.dim)
    text_e = TwoLayerMLP(
        self.dim, self.dim, "gelu_tanh", dtype=self.dtype, param_dtype=self.param_dtype, name="text_embedder"
    )(text.astype(self.dtype))
    image_e = None
    if self.has_image:
      image_e = ImageEmbedder(self.dim, self.dtype, self.param_dtype, name="image_embedder")(image)
    return temb, t_proj, text_e, image_e


class _Attention(nn.Module):
  """What ``attn1`` and ``attn2`` share: projections at the model width, the RMS q/k norm across heads, heads."""

  dim: int
  num_heads: int
  eps: float
  qk_norm: bool
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _dense(self, name: str, axes: tuple[str, str] = ("embed", "heads")) -> nn.Dense:
    return layers.dense(self.dim, axes, name, self.dtype, self.param_dtype)

  def _norm(self, name: str, a: Array) -> Array:
    return _rms_norm(self.eps, self.param_dtype, name)(a).astype(self.dtype) if self.qk_norm else a

  def _heads(self, a: Array, axes: tuple[str | None, ...] = BLHD) -> Array:
    return nn.with_logical_constraint(einops.rearrange(a, "b l (h d) -> b l h d", h=self.num_heads), axes)

  def _out(self, o: Array) -> Array:
    o = nn.with_logical_constraint(einops.rearrange(o, "b l h d -> b l (h d)"), BLH)
    return self._dense("to_out_0", ("heads", "embed"))(o)


class SelfAttention(_Attention):
  """``attn1``: q/k/v projections, RMS q/k norm across heads, 3D RoPE, attention over the valid prefix.

  ``kv_lengths`` [B] (or None = every token valid): tokens at positions ``>= kv_lengths[b]`` are padding keys.
  """

  @nn.compact
  def __call__(self, x: Array, cos: Array, sin: Array, kv_lengths: Array | None) -> Array:
    q = rope.apply_rope(self._heads(self._norm("norm_q", self._dense("to_q")(x))), cos, sin)
    k = rope.apply_rope(self._heads(self._norm("norm_k", self._dense("to_k")(x))), cos, sin)
    v = self._heads(self._dense("to_v")(x))
    return self._out(attention(q, k, v, None, self.attention_impl, kv_lengths=kv_lengths, kv_follows_q=True))


class CrossAttention(_Attention):
  """``attn2``: queries from the sequence, keys/values from text (+ image tokens for I2V, Wan's
  decoupled cross-attention: the two attention outputs are summed). No RoPE."""

  has_image: bool = False

  @nn.compact
  def __call__(self, x: Array, text: Array, image: Array | None, text_mask: Array | None) -> Array:
    q = self._heads(self._norm("norm_q", self._dense("to_q")(x)))
    k = self._heads(self._norm("norm_k", self._dense("to_k")(text)), CROSS_KV)
    v = self._heads(self._dense("to_v")(text), CROSS_KV)
    o = attention(q, k, v, text_mask, self.attention_impl, kv_follows_q=False)
    if self.has_image:
      k_img = self._heads(self._norm("norm_added_k", self._dense("add_k_proj")(image)), CROSS_KV)
      v_img = self._heads(self._dense("add_v_proj")(image), CROSS_KV)
      o = o + attention(q, k_img, v_img, None, self.attention_impl, kv_follows_q=False)
    return self._out(o)


class WanBlock(nn.Module):
  """One Wan transformer block with per-token (noise / context) adaLN modulation.

  ``t_proj`` modulates the noise tokens: ``[B, 6, dim]`` (one timestep per sample, Wan2.1) or
  ``[B, N, 6, dim]`` (one per noise token, Wan2.2-TI2V); the noise tokens are the first N of
  the sequence. ``t_proj_ctx`` [B, 6, dim] (or None) modulates the tokens where ``is_ctx`` [L]
  is True (the context tokens, which follow the noise tokens). With ``scanned`` the call
  returns ``(x, None)`` for ``nn.scan``.
  """

  dim: int
  ffn_dim: int
  num_heads: int
  eps: float
  qk_norm: bool
  cross_attn_norm: bool
  has_image: bool
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  scanned: bool = False

  @nn.compact
  def __call__(self, x, t_proj, t_proj_ctx, is_ctx, cos, sin, kv_lengths, text, image, text_mask):
    table = self.param(
        "scale_shift_table",
        nn.with_logical_partitioning(nn.initializers.normal(self.dim**-0.5), (None, None, "embed")),
        (1, 6, self.dim),
        self.param_dtype,
    )

    def mod(i: int) -> Array:
      """Modulation vector i, [B, 1, dim] (one per sample) or [B, L, dim] (per token), float32."""
      base = table[0, i].astype(jnp.float32)
      if t_proj.ndim == 4:  # per noise token
        m = base + t_proj[:, :, i].astype(jnp.float32)
      else:
        m = (base + t_proj[:, i].astype(jnp.float32))[:, None]
      if t_proj_ctx is None:
        return m
      mc = (base + t_proj_ctx[:, i].astype(jnp.float32))[:, None]
      if t_proj.ndim == 4:
        nc = x.shape[1] - m.shape[1]
        return jnp.concatenate([m, jnp.broadcast_to(mc, (mc.shape[0], nc, mc.shape[-1]))], axis=1)
      return jnp.where(is_ctx[None, :, None], mc, m)

    def residual(x: Array, y: Array, gate: Array) -> Array:
      return (x.astype(jnp.float32) + y.astype(jnp.float32) * gate).astype(x.dtype)

    norm1 = layers.layer_norm(self.eps, param_dtype=self.param_dtype, affine=False, name="norm1")
    h = nn.with_logical_constraint((norm1(x) * (1.0 + mod(1)) + mod(0)).astype(self.dtype), BLD)
    kw = dict(
        dim=self.dim,
        num_heads=self.num_heads,
        eps=self.eps,
        qk_norm=self.qk_norm,
        attention_impl=self.attention_impl,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
    )
    attn = SelfAttention(**kw, name="attn1")
    x = nn.with_logical_constraint(residual(x, attn(h, cos, sin, kv_lengths), mod(2)), BLD)

    if self.cross_attn_norm:
      h = layers.layer_norm(self.eps, param_dtype=self.param_dtype, name="norm2")(x).astype(self.dtype)
    else:
      h = x
    cross = CrossAttention(**kw, has_image=self.has_image, name="attn2")
    x = nn.with_logical_constraint(x + cross(h, text, image, text_mask).astype(x.dtype), BLD)

    norm3 = layers.layer_norm(self.eps, param_dtype=self.param_dtype, affine=False, name="norm3")
    h = nn.with_logical_constraint((norm3(x) * (1.0 + mod(4)) + mod(3)).astype(self.dtype), BLD)
    ffn = FeedForward(self.ffn_dim, self.dim, True, "embed", self.dtype, self.param_dtype, BLM, name="ffn")
    x = nn.with_logical_constraint(residual(x, ffn(h), mod(5)), BLD)
    return (x, None) if self.scanned else x


# ----------------------------------------------------------------------------- the model


class WanTransformer3D(nn.Module):
  """Wan2.1 DiT (diffusers ``WanTransformer3DModel`` semantics) + OneStory context tokens.

  Attributes mirror ``config.model`` (see ``configs/onestory.py``); ``image_dim`` set means
  an I2V model with image cross-attention. ``attention_impl`` is the attention backend
  (``config.model.attention``: 'xla' | 'blocked' | 'cudnn' | 'splash' | 'auto'), forwarded to :func:`attention`.
  """

  in_channels: int
  out_channels: int
  text_dim: int
  image_dim: int | None = None
  dim: int = 128
  ffn_dim: int = 512
  num_heads: int = 4
  num_layers: int = 4
  patch_size: tuple[int, int, int] = (1, 2, 2)
  freq_dim: int = 256
  eps: float = 1e-6
  qk_norm: bool = True
  cross_attn_norm: bool = True
  rope_theta: float = 10000.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  scan_layers: bool = False
  remat: str = "none"
  attention_impl: str = "auto"

  @classmethod
  def from_config(
      cls,
      model_cfg: Any,
      in_channels: int,
      out_channels: int,
      text_dim: int,
      image_dim: int | None = None,
      **overrides: Any,
  ) -> "WanTransformer3D":
    """Builds the DiT from ``config.model`` (fields as in ``configs/onestory.py``)."""
    fields = (
        "dim",
        "ffn_dim",
        "num_heads",
        "num_layers",
        "patch_size",
        "freq_dim",
        "eps",
        "qk_norm",
        "cross_attn_norm",
        "rope_theta",
        "dtype",
        "param_dtype",
        "scan_layers",
        "remat",
    )
    kw = {}
    for f in fields:
      if f not in model_cfg:
        raise ValueError(f"config.model.{f} is missing; expected the fields of configs/onestory.py")
      kw[f] = model_cfg[f]
    kw["patch_size"] = _triple(kw["patch_size"], "config.model.patch_size")
    kw["dtype"] = _as_dtype(kw["dtype"], "dtype")
    kw["param_dtype"] = _as_dtype(kw["param_dtype"], "param_dtype")
    # Optional: configs saved before the attention registry existed mean 'auto'.
    kw["attention_impl"] = attention_lib.check_backend(model_cfg.get("attention", attention_lib.AUTO))
    kw.update(overrides)
    return cls(in_channels=in_channels, out_channels=out_channels, text_dim=text_dim, image_dim=image_dim, **kw)

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads

  def _check_attributes(self) -> None:
    if self.dim % self.num_heads:
      raise ValueError(f"model.dim ({self.dim}) must be divisible by model.num_heads ({self.num_heads})")
    rope.rope_split(self.head_dim)
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"model.remat must be one of {REMAT_POLICIES}; got {self.remat!r}")
    _triple(self.patch_size, "model.patch_size")
    if self.num_layers < 1:
      raise ValueError(f"model.num_layers must be >= 1; got {self.num_layers}")
    attention_lib.check_backend(self.attention_impl)

  def _check_inputs(
      self, x, timestep, text, image, text_mask, context, context_pos, context_mask, context_timestep
  ) -> None:
    if x.ndim != 5 or x.shape[-1] != self.in_channels:
      raise ValueError(f"x: expected [B, F, H, W, {self.in_channels}]; got {x.shape}")
    b = x.shape[0]
    pt, ph, pw = self.patch_size
    if x.shape[1] % pt or x.shape[2] % ph or x.shape[3] % pw:
      raise ValueError(f"x: (F, H, W) = {x.shape[1:4]} must be divisible by patch_size {self.patch_size}")
    n = (x.shape[1] // pt) * (x.shape[2] // ph) * (x.shape[3] // pw)
    if timestep.shape not in ((b,), (b, n)):
      raise ValueError(
          f"timestep: expected shape [B] = ({b},) or per noise token [B, N] = ({b}, {n}); " f"got {timestep.shape}"
      )
    if text.ndim != 3 or text.shape[0] != b or text.shape[-1] != self.text_dim:
      raise ValueError(f"text: expected [B, Lt, {self.text_dim}] with B = {b}; got {text.shape}")
    if text_mask is not None and text_mask.shape != text.shape[:2]:
      raise ValueError(f"text_mask: expected [B, Lt] = {text.shape[:2]}; got {text_mask.shape}")
    if self.image_dim is None and image is not None:
      raise ValueError("image: this DiT has no image cross-attention (image_dim=None); pass image=None")
    if self.image_dim is not None:
      if image is None:
        raise ValueError("image: required by an I2V DiT (image_dim set); pass zeros for 'no image'")
      if image.ndim != 3 or image.shape[0] != b or image.shape[-1] != self.image_dim:
        raise ValueError(f"image: expected [B, Li, {self.image_dim}] with B = {b}; got {image.shape}")
    if context is None:
      if any(a is not None for a in (context_pos, context_mask, context_timestep)):
        raise ValueError("context_pos/context_mask/context_timestep given without context")
      return
    if context.ndim != 3 or context.shape[0] != b or context.shape[-1] != self.dim:
      raise ValueError(f"context: expected [B, Nc, {self.dim}] with B = {b}; got {context.shape}")
    nc = context.shape[1]
    if context_pos is None or context_pos.shape != (b, nc, 3):
      raise ValueError(
          f"context_pos: expected [B, Nc, 3] = ({b}, {nc}, 3); got "
          f"{None if context_pos is None else context_pos.shape}"
      )
    if context_mask is not None and context_mask.shape != (b, nc):
      raise ValueError(f"context_mask: expected [B, Nc] = ({b}, {nc}); got {context_mask.shape}")
    if context_timestep is not None and context_timestep.shape != (b,):
      raise ValueError(f"context_timestep: expected [B] = ({b},); got {context_timestep.shape}")

  def _blocks(self):
    """The block stack: unrolled ``blocks_i`` or one scanned ``blocks`` module."""
    cls = WanBlock
    if self.remat != "none":
      policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if self.remat == "dots" else None
      cls = nn.remat(cls, policy=policy, prevent_cse=not self.scan_layers)
    kw = dict(
        dim=self.dim,
        ffn_dim=self.ffn_dim,
        num_heads=self.num_heads,
        eps=self.eps,
        qk_norm=self.qk_norm,
        cross_attn_norm=self.cross_attn_norm,
        has_image=self.image_dim is not None,
        attention_impl=self.attention_impl,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
    )
    if self.scan_layers:
      scanned = nn.scan(
          cls,
          variable_axes={"params": 0},
          split_rngs={"params": True},
          in_axes=(nn.broadcast,) * 9,
          length=self.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )
      block = scanned(scanned=True, name="blocks", **kw)
      return lambda x, *args: block(x, *args)[0]
    blocks = [cls(name=f"blocks_{i}", **kw) for i in range(self.num_layers)]

    # XLA:CPU keeps no value between unrolled blocks unless told: it fuses the residual stream, and in the backward
    # pass its gradient, into every consumer and recomputes the whole chain of earlier (later) blocks there, worst in
    # the copies that transpose the gradient for the weight-gradient matmuls. Storing both at each block boundary
    # made the demo-size DiT's forward + backward 1.7x faster, with bit-identical results. A scanned stack stores its
    # carry anyway, and GPU and TPU compilers need no help here (and would pay a collective for the predicate).
    store = attention_lib.current_platform() == "cpu"

    def run(x, *args):
      for blk in blocks:
        x = blk(x, *args)
        if store:
          x = _stored(x)
      return x

    return run

  @nn.compact
  def __call__(
      self,
      x: Array,
      timestep: Array,
      text: Array,
      image: Array | None = None,
      *,
      text_mask: Array | None = None,
      context: Array | None = None,
      context_pos: Array | None = None,
      context_mask: Array | None = None,
      context_timestep: Array | None = None,
      deterministic: bool = True,
  ) -> Array:
    """Predicts the flow-matching velocity of the noise latents.

    Args:
      x: latents ``[B, F, H, W, in_channels]``.
      timestep: ``[B]`` in [0, 1000], or ``[B, N]`` with one timestep per noise token
        (N = number of patches, raster order), as diffusers' Wan2.2-TI2V pipeline passes with
        ``expand_timesteps`` (first-frame tokens at t = 0). Per-token timesteps modulate every
        block and the output head token by token, as in the reference.
      text: caption embeddings ``[B, Lt, text_dim]`` (Wan zero-pads them and masks nothing).
      image: ``[B, Li, image_dim]`` CLIP tokens, required iff ``image_dim`` is set.
      text_mask: optional ``[B, Lt]`` bool key mask for the text (None = Wan semantics).
      context: OneStory context tokens ``[B, Nc, dim]`` (Eq. 8), already patch-embedded.
      context_pos: ``[B, Nc, 3]`` float RoPE positions (t, h, w) of the context tokens.
      context_mask: ``[B, Nc]`` bool, False = padding; default all valid.
      context_timestep: ``[B]`` timestep of the context tokens; default 0 (clean).
      deterministic: accepted for a uniform model interface; Wan2.1 has no dropout, so the
        output does not depend on it.

    Returns:
      ``[B, F, H, W, out_channels]``.
    """
    del deterministic  # Wan2.1 has no dropout layers.
    self._check_attributes()
    x, timestep, text = jnp.asarray(x), jnp.asarray(timestep), jnp.asarray(text)
    self._check_inputs(x, timestep, text, image, text_mask, context, context_pos, context_mask, context_timestep)
    b, f, h, w, _ = x.shape
    pt, ph, pw = self.patch_size
    grid = (f // pt, h // ph, w // pw)
    n = grid[0] * grid[1] * grid[2]

    tokens = PatchEmbed(self.dim, self.patch_size, self.dtype, self.param_dtype, name="patch_embedding")(x)
    tokens = nn.with_logical_constraint(tokens, BLD)

    per_token = timestep.ndim == 2
    times = timestep.astype(jnp.float32).reshape(-1)  # [B] or [B * N]
    n_times = times.shape[0]
    if context is not None:
      ctx_t = jnp.zeros((b,), jnp.float32) if context_timestep is None else context_timestep.astype(jnp.float32)
      times = jnp.concatenate([times, ctx_t])
    temb, t_proj, text_e, image_e = ConditionEmbedder(
        self.dim, self.freq_dim, self.image_dim is not None, self.dtype, self.param_dtype, name="condition_embedder"
    )(times, text, image)
    temb, t_proj_ctx, t_proj = temb[:n_times], t_proj[n_times:], t_proj[:n_times]
    if per_token:
      temb = temb.reshape(b, n, self.dim)
      t_proj = t_proj.reshape(b, n, 6, self.dim)

    pos = jnp.broadcast_to(rope.grid_positions(*grid)[None], (b, n, 3))
    if context is None:
      t_proj_ctx, is_ctx, kv_lengths, seq = None, None, None, tokens
    else:
      nc = context.shape[1]
      context_pos = context_pos.astype(jnp.float32)
      kv_lengths = None
      if context_mask is not None:
        # Valid context tokens first (a stable sort; the identity for the Adaptive Conditioner's packed output):
        # the key padding of self-attention is then a suffix, which every backend takes as lengths (cuDNN
        # needs that form). Exact: the noise outputs do not depend on the order of the context tokens, which
        # carry their own RoPE positions and share one modulation, and whose outputs are discarded.
        n_valid, (context, context_pos) = attention_lib.pack_valid_first(context_mask, context, context_pos)
        kv_lengths = n + n_valid
      seq = jnp.concatenate([tokens, context.astype(self.dtype)], axis=1)
      seq = nn.with_logical_constraint(seq, BLD)
      pos = jnp.concatenate([pos, context_pos], axis=1)
      is_ctx = jnp.arange(n + nc) >= n
    cos, sin = rope.rope_angles(pos, self.head_dim, self.rope_theta)
    cos = nn.with_logical_constraint(cos, ("batch", "length", None))
    sin = nn.with_logical_constraint(sin, ("batch", "length", None))

    seq = self._blocks()(seq, t_proj, t_proj_ctx, is_ctx, cos, sin, kv_lengths, text_e, image_e, text_mask)

    out = nn.with_logical_constraint(seq[:, :n], BLD)  # context outputs are discarded (Eq. 8)
    table = self.param(
        "scale_shift_table",
        nn.with_logical_partitioning(nn.initializers.normal(self.dim**-0.5), (None, None, "embed")),
        (1, 2, self.dim),
        self.param_dtype,
    )
    if per_token:  # temb [B, N, dim]: shift and scale per token
      shift = table[0, 0].astype(jnp.float32) + temb
      scale = table[0, 1].astype(jnp.float32) + temb
    else:  # temb [B, dim]
      shift = (table[0, 0].astype(jnp.float32) + temb)[:, None]
      scale = (table[0, 1].astype(jnp.float32) + temb)[:, None]
    norm_out = layers.layer_norm(self.eps, param_dtype=self.param_dtype, affine=False, name="norm_out")
    out = (norm_out(out) * (1.0 + scale) + shift).astype(self.dtype)
    out = layers.dense(
        self.out_channels * pt * ph * pw, ("embed", "conv_out"), "proj_out", self.dtype, self.param_dtype, _zeros
    )(out)
    return unpatchify(out, grid, self.patch_size)


def make_dit(
    config: Any, in_channels: int, out_channels: int, text_dim: int, image_dim: int | None = None, **overrides: Any
) -> WanTransformer3D:
  """Builds the DiT from a full experiment config (reads ``config.model``)."""
  if "model" not in config:
    raise ValueError("make_dit: config has no 'model' section (see configs/onestory.py)")
  return WanTransformer3D.from_config(config.model, in_channels, out_channels, text_dim, image_dim, **overrides)


# ----------------------------------------------------------------------------- published weights
#
# The diffusers ``WanTransformer3DModel`` state dict -> this module's parameters. Module names
# are the same up to ``.`` -> ``_`` in list indices (``to_out.0`` -> ``to_out_0``, ``net.0`` ->
# ``net_0``, ``blocks.3`` -> ``blocks_3``); leaves are renamed (Linear/Conv ``weight`` ->
# ``kernel``, norm ``weight`` -> ``scale``) and Linear/Conv weights change layout
# (:func:`weights.linear`, :func:`weights.conv`).

# Published module name -> (our module path, kind). kind: 'linear' | 'conv' | 'rms' | 'ln'.
_TOP_MODULES = {
    "patch_embedding": (("patch_embedding",), "conv"),
    "condition_embedder.time_embedder.linear_1": (("condition_embedder", "time_embedder", "linear_1"), "linear"),
    "condition_embedder.time_embedder.linear_2": (("condition_embedder", "time_embedder", "linear_2"), "linear"),
    "condition_embedder.time_proj": (("condition_embedder", "time_proj"), "linear"),
    "condition_embedder.text_embedder.linear_1": (("condition_embedder", "text_embedder", "linear_1"), "linear"),
    "condition_embedder.text_embedder.linear_2": (("condition_embedder", "text_embedder", "linear_2"), "linear"),
    "condition_embedder.image_embedder.norm1": (("condition_embedder", "image_embedder", "norm1"), "ln"),
    "condition_embedder.image_embedder.ff.net.0.proj": (
        ("condition_embedder", "image_embedder", "ff", "net_0", "proj"),
        "linear",
    ),
    "condition_embedder.image_embedder.ff.net.2": (("condition_embedder", "image_embedder", "ff", "net_2"), "linear"),
    "condition_embedder.image_embedder.norm2": (("condition_embedder", "image_embedder", "norm2"), "ln"),
    "proj_out": (("proj_out",), "linear"),
}
_BLOCK_MODULES = {
    **{f"{a}.{p}": ((a, p), "linear") for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v")},
    **{f"{a}.to_out.0": ((a, "to_out_0"), "linear") for a in ("attn1", "attn2")},
    **{f"{a}.{p}": ((a, p), "rms") for a in ("attn1", "attn2") for p in ("norm_q", "norm_k")},
    "attn2.add_k_proj": (("attn2", "add_k_proj"), "linear"),
    "attn2.add_v_proj": (("attn2", "add_v_proj"), "linear"),
    "attn2.norm_added_k": (("attn2", "norm_added_k"), "rms"),
    "norm2": (("norm2",), "ln"),
    "ffn.net.0.proj": (("ffn", "net_0", "proj"), "linear"),
    "ffn.net.2": (("ffn", "net_2"), "linear"),
}
# kind -> {published leaf: (our leaf, transform)}
_LEAVES = {
    "linear": {"weight": ("kernel", weights.linear), "bias": ("bias", weights.identity)},
    "conv": {"weight": ("kernel", weights.conv), "bias": ("bias", weights.identity)},
    "rms": {"weight": ("scale", weights.identity)},
    "ln": {"weight": ("scale", weights.identity), "bias": ("bias", weights.identity)},
}
# Saved by some conversions but never used by the reference: diffusers lists it in
# ``_keys_to_ignore_on_load_unexpected``.
_IGNORED_BLOCK_MODULES = ("attn2.norm_added_q",)
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")


def torch_key_to_target(name: str, *, num_layers: int, scanned: bool) -> weights.Target | None:
  """Maps one tensor name of a diffusers ``WanTransformer3DModel`` state dict to our parameter.

  Args:
    name: the published tensor name, e.g. ``"blocks.3.attn1.to_q.weight"``.
    num_layers: the model's number of blocks (block indices are checked against it).
    scanned: True for ``scan_layers=True`` models, whose block parameters are stacked in one
      ``blocks`` collection: the target then has path ``("blocks", ...)`` and ``layer=i``.
      False gives ``("blocks_i", ...)`` with ``layer=None``.

  Returns:
    The :class:`weights.Target`, or None for ``blocks.i.attn2.norm_added_q.weight``, a tensor
    that the reference itself ignores on load.

  Raises:
    ValueError: for every other name this module does not know (naming the key), e.g. the
      FLF2V ``image_embedder.pos_embed`` or fused ``to_qkv`` projections, which this port
      does not implement, or a block index outside ``[0, num_layers)``.
  """
  module, _, leaf = name.rpartition(".")
  match = _BLOCK_KEY.fullmatch(name)
  if match:
    layer = int(match.group(1))
    rest = match.group(2)
    if layer >= num_layers:
      raise ValueError(
          f"transformer key {name!r}: block index {layer} is outside [0, {num_layers}) " f"(num_layers of the config)"
      )
    if rest == "scale_shift_table":
      sub, kind, leaf_map = ("scale_shift_table",), None, None
    else:
      sub_module, _, leaf = rest.rpartition(".")
      if sub_module in _IGNORED_BLOCK_MODULES:
        return None
      if sub_module not in _BLOCK_MODULES or leaf not in _LEAVES[_BLOCK_MODULES[sub_module][1]]:
        raise ValueError(
            f"transformer key {name!r} is not a parameter of the Wan DiT port "
            f"(known block modules: {sorted(_BLOCK_MODULES)})"
        )
      path, kind = _BLOCK_MODULES[sub_module]
      leaf_map = _LEAVES[kind][leaf]
      sub = path + (leaf_map[0],)
    transform = weights.identity if leaf_map is None else leaf_map[1]
    if scanned:
      return weights.Target(("blocks",) + sub, transform, layer)
    return weights.Target((f"blocks_{layer}",) + sub, transform, None)
  if name == "scale_shift_table":
    return weights.Target(("scale_shift_table",))
  if module in _TOP_MODULES and leaf in _LEAVES[_TOP_MODULES[module][1]]:
    path, kind = _TOP_MODULES[module]
    ours, transform = _LEAVES[kind][leaf]
    return weights.Target(path + (ours,), transform)
  raise ValueError(
      f"transformer key {name!r} is not a parameter of the Wan DiT port "
      f"(known modules: {sorted(_TOP_MODULES)} and blocks.<i>.*)"
  )


_DIFFUSERS_REQUIRED = (
    "patch_size",
    "num_attention_heads",
    "attention_head_dim",
    "in_channels",
    "text_dim",
    "freq_dim",
    "ffn_dim",
    "num_layers",
    "cross_attn_norm",
    "eps",
)


def config_from_diffusers(cfg: dict) -> dict:
  """The DiT sizes of a diffusers ``WanTransformer3DModel`` ``config.json``, in our terms.

  Returns a dict with the ``config.model`` fields ``dim, ffn_dim, num_heads, num_layers,
  patch_size, freq_dim, eps, qk_norm, cross_attn_norm, rope_theta`` and the constructor
  arguments ``in_channels, out_channels, text_dim, image_dim``.

  Notes on the reference: ``qk_norm`` is always True, because diffusers' ``WanAttention``
  builds and applies the across-heads RMS q/k norms whatever the field says; RoPE uses theta
  10000 (not configurable there); ``out_channels`` null means ``in_channels``.

  Raises:
    ValueError: missing fields, or features this port does not implement: FLF2V image
      position embeddings (``pos_embed_seq_len``), or an image branch whose added k/v
      projections do not take the model width (``added_kv_proj_dim`` must equal
      ``num_attention_heads * attention_head_dim`` exactly when ``image_dim`` is set).
  """
  missing = [k for k in _DIFFUSERS_REQUIRED if k not in cfg]
  if missing:
    raise ValueError(
        f"transformer config.json: missing fields {missing}; expected a diffusers " f"WanTransformer3DModel config"
    )
  dim = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
  image_dim = cfg.get("image_dim")
  added_kv = cfg.get("added_kv_proj_dim")
  if cfg.get("pos_embed_seq_len") is not None:
    raise ValueError(
        f"transformer config.json: pos_embed_seq_len={cfg['pos_embed_seq_len']} (FLF2V "
        f"image position embedding) is not supported by this port; expected null"
    )
  if (image_dim is None) != (added_kv is None) or (added_kv is not None and int(added_kv) != dim):
    raise ValueError(
        f"transformer config.json: image_dim={image_dim} with added_kv_proj_dim={added_kv}; "
        f"expected both null (T2V/TI2V) or added_kv_proj_dim = num_attention_heads * "
        f"attention_head_dim = {dim} with image_dim set (I2V)"
    )
  if cfg.get("qk_norm", "rms_norm_across_heads") not in (None, "rms_norm_across_heads"):
    raise ValueError(
        f"transformer config.json: qk_norm={cfg['qk_norm']!r}; expected "
        f"'rms_norm_across_heads' (what the reference computes)"
    )
  out_channels = cfg.get("out_channels") or cfg["in_channels"]
  return dict(
      dim=dim,
      ffn_dim=int(cfg["ffn_dim"]),
      num_heads=int(cfg["num_attention_heads"]),
      num_layers=int(cfg["num_layers"]),
      patch_size=_triple(cfg["patch_size"], "config.json patch_size"),
      freq_dim=int(cfg["freq_dim"]),
      eps=float(cfg["eps"]),
      qk_norm=True,
      cross_attn_norm=bool(cfg["cross_attn_norm"]),
      rope_theta=10000.0,
      in_channels=int(cfg["in_channels"]),
      out_channels=int(out_channels),
      text_dim=int(cfg["text_dim"]),
      image_dim=None if image_dim is None else int(image_dim),
  )


def dit_from_diffusers(cfg: dict, **overrides: Any) -> WanTransformer3D:
  """A :class:`WanTransformer3D` with the sizes of a diffusers ``config.json``.

  ``overrides`` set the execution fields (``dtype``, ``param_dtype``, ``scan_layers``,
  ``remat``, ``attention_impl``).
  """
  kw = config_from_diffusers(cfg)
  kw.update(overrides)
  return WanTransformer3D(**kw)


def config_mismatches(
    model_cfg: Any,
    diffusers_cfg: dict,
    *,
    in_channels: int | None = None,
    out_channels: int | None = None,
    text_dim: int | None = None,
    image_dim: int | None = None,
) -> list[str]:
  """Differences between a run config's ``config.model`` and a release's ``config.json``.

  Compares every size in :func:`config_from_diffusers` that ``model_cfg`` has (and the
  channel/width arguments given); returns readable lines, empty when they agree.
  """
  ref = config_from_diffusers(diffusers_cfg)
  ours = {k: model_cfg[k] for k in ref if k in model_cfg}
  ours.update(
      {
          k: v
          for k, v in dict(
              in_channels=in_channels, out_channels=out_channels, text_dim=text_dim, image_dim=image_dim
          ).items()
          if v is not None
      }
  )
  out = []
  for k, v in ours.items():
    v = tuple(v) if k == "patch_size" else v
    if v != ref[k]:
      out.append(f"model.{k}: run config has {v!r}, the release has {ref[k]!r}")
  return out


def abstract_params(model: WanTransformer3D, *, boxed: bool = False) -> Any:
  """The parameter tree of ``model`` as ``jax.ShapeDtypeStruct`` leaves, without allocating.

  With ``boxed`` the leaves keep their Flax logical-partitioning boxes (for
  :func:`sharding.logical_to_shardings`).
  """
  pt, ph, pw = _triple(model.patch_size)
  x = jax.ShapeDtypeStruct((1, pt, ph, pw, model.in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  text = jax.ShapeDtypeStruct((1, 1, model.text_dim), jnp.float32)
  image = None if model.image_dim is None else jax.ShapeDtypeStruct((1, 1, model.image_dim), jnp.float32)
  variables = jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a), x, t, text, image)
  params = variables["params"]
  if boxed:
    return params
  is_box = lambda v: isinstance(v, nn.meta.AxisMetadata)  # noqa: E731
  return jax.tree.map(lambda v: v.unbox(apply_constraint=False) if is_box(v) else v, params, is_leaf=is_box)
