"""DINOv2 ViT (Oquab et al. 2023, arXiv 2304.07193) in Flax Linen, with optional register tokens.

OneStory (arXiv 2512.07802, App. A.2) labels every historical frame with its relevance to the target shot: the cosine
similarity of DINOv2 and CLIP image embeddings (:mod:`onestory_jax.data.pseudo_labels`). This module is the DINOv2
half. The semantics are those of transformers' ``Dinov2Model`` and ``Dinov2WithRegistersModel`` (Darcet et al. 2023,
arXiv 2309.16588):

  x = [cls_token; Conv_p(pixels)] + interp(position_embeddings)   # patch conv with bias, stride p
  x = [x_cls; register_tokens; x_patches]                          # registers only: no position embedding
  h = h + LayerScale1(Attn(LN1(h)));  h = h + LayerScale2(MLP(LN2(h)))   # per layer; LayerScale: h * lambda
  last_hidden_state = LN(h_L);  pooler_output = last_hidden_state[:, 0]   # the CLS token after the final norm

Attention: biased q/k/v (``qkv_bias``) and output projections of the full width, logits scaled by 1/sqrt(head_dim),
through the project's attention backend (:func:`onestory_jax.models.attention.dot_product_attention`, ``'xla'``
unless ``attention`` names another). MLP: fc1, activation (``gelu``, erf), fc2, hidden ``int(D * mlp_ratio)``; with
``use_swiglu_ffn`` (ViT-g/14) a SwiGLU, ``weights_out(silu(a) * b)`` with ``[a, b] = weights_in(x)`` and hidden
``ceil8(int(int(D * mlp_ratio) * 2 / 3))``.

Position embeddings are published for a square grid (37 x 37 for the 518-pixel releases). For another input grid
``(H // p, W // p)`` the patch part is resampled bicubically, as transformers does it:

* ``Dinov2Model``: ``torch.nn.functional.interpolate(mode='bicubic', align_corners=False)``, Keys' cubic with
  a = -0.75, source coordinate ``(i + 0.5) * in / out - 0.5``, taps clamped at the border.
* ``Dinov2WithRegistersModel``: the same with ``antialias=True``: Keys' cubic with a = -0.5, widened by in / out when
  shrinking, weights renormalised over the taps inside the image (PIL's filter).

Both are separable linear maps of fixed size, so :func:`bicubic_matrix` builds each as an ``[out, in]`` matrix (in
float64, at trace time) and the embedding is resampled in float32 by two matrix products. An input whose side is
not a multiple of p loses its last ``side % p`` rows / columns, as the stride-p convolution drops them.

Weights: the Flax tree mirrors transformers' saved layout (which ``save_pretrained`` writes and the published
``facebook/dinov2-*`` releases have), so :func:`torch_key_to_target` is a rename plus the layout change of
:mod:`onestory_jax.weights` (Linear ``[out, in]`` -> ``[in, out]``, Conv ``[D, C, p, p]`` -> ``[p, p, C, D]``):

  embeddings.{cls_token, mask_token, position_embeddings, register_tokens}   -> embeddings/<same>
  embeddings.patch_embeddings.projection.{weight, bias}                     -> embeddings/patch_embeddings/{kernel, bias}
  encoder.layer.N.attention.attention.{query, key, value}.{weight, bias}    -> encoder/layer_N/attention/{query, ...}
  encoder.layer.N.attention.output.dense.{weight, bias}                     -> encoder/layer_N/attention/output
  encoder.layer.N.{norm1, norm2}.{weight, bias}                              -> encoder/layer_N/{norm1, norm2}
  encoder.layer.N.{layer_scale1, layer_scale2}.lambda1                      -> encoder/layer_N/<same>/lambda1
  encoder.layer.N.mlp.{fc1, fc2, weights_in, weights_out}.{weight, bias}    -> encoder/layer_N/mlp/<same>
  layernorm.{weight, bias}                                                  -> layernorm/{scale, bias}

:func:`load_dinov2` reads a release directory (``config.json`` + ``model.safetensors``, or shards with an index;
never a pickle) straight into ``(module, params)``, after checking every key and shape against the module's tree
(:func:`onestory_jax.weights.plan_conversion`). The converter (``python -m onestory_jax.convert
--components=dinov2``) writes the same tree as an orbax checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from onestory_jax import sharding
from onestory_jax import weights
from onestory_jax.models import attention as attention_lib
from onestory_jax.models import layers

Dtype = Any

# ImageNet statistics: the normalisation of DINOv2's image processor (BitImageProcessor in the published releases).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
}
_INIT = nn.initializers.truncated_normal(0.02)  # transformers' initializer_range; a checkpoint replaces it


def _partitioned(init, axes):
  return nn.with_logical_partitioning(init, axes)


def _dense(features: int, axes, name: str, *, use_bias: bool = True, dtype: Dtype, param_dtype: Dtype) -> nn.Dense:
  return nn.Dense(
      features,
      use_bias=use_bias,
      name=name,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=_partitioned(_INIT, axes),
      bias_init=_partitioned(nn.initializers.zeros_init(), (axes[1],)),
  )


def swiglu_hidden_size(hidden_size: int, mlp_ratio: float) -> int:
  """Hidden width of DINOv2's SwiGLU: two thirds of ``int(D * mlp_ratio)``, rounded up to a multiple of 8."""
  return (int(int(hidden_size * mlp_ratio) * 2 / 3) + 7) // 8 * 8


# ---------------------------------------------------------------------------- position interpolation
def _keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with parameter ``a`` (zero for |x| >= 2)."""
  x = np.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
  return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def bicubic_matrix(in_size: int, out_size: int, antialias: bool) -> np.ndarray:
  """The ``[out_size, in_size]`` matrix of PyTorch's 1-D bicubic resampling (``align_corners=False``), float64.

  ``antialias=False`` is ``F.interpolate(mode='bicubic')``: a = -0.75, source ``(i + 0.5) * s - 0.5`` with ``s = in /
  out``, four taps at ``floor(source) - 1 .. + 2`` clamped into the input. ``antialias=True`` is the antialiased
  variant (PIL's bicubic): a = -0.5, support ``2 * max(s, 1)``, centre ``(i + 0.5) * s``, the kernel evaluated at
  ``(j + 0.5 - centre) / max(s, 1)`` for the input samples ``j`` inside the support and the image, then normalised
  to sum to one.
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"bicubic_matrix: sizes must be positive, got in {in_size}, out {out_size}")
  scale = in_size / out_size
  out = np.zeros((out_size, in_size), np.float64)
  if not antialias:
    for i in range(out_size):
      src = (i + 0.5) * scale - 0.5
      base = math.floor(src)
      t = src - base
      taps = _keys_cubic(np.array([t + 1.0, t, 1.0 - t, 2.0 - t]), -0.75)
      for k, w in enumerate(taps):
        out[i, min(max(base - 1 + k, 0), in_size - 1)] += w
    return out
  support = 2.0 * max(scale, 1.0)
  inv = 1.0 / max(scale, 1.0)
  for i in range(out_size):
    centre = scale * (i + 0.5)
    lo = max(int(centre - support + 0.5), 0)
    hi = min(int(centre + support + 0.5), in_size)
    j = np.arange(lo, hi)
    w = _keys_cubic((j - centre + 0.5) * inv, -0.5)
    total = w.sum()
    out[i, lo:hi] = w / total if total != 0 else w
  return out


def interpolate_position_embeddings(
    position_embeddings: jax.Array, grid: tuple[int, int], antialias: bool = False
) -> jax.Array:
  """Resamples ``[1, 1 + g * g, D]`` position embeddings (CLS first) to a ``grid = (gh, gw)`` patch grid.

  The CLS entry is kept; the patch entries, a row-major g x g grid, are resampled bicubically (:func:`bicubic_matrix`)
  in float32 and returned in the input dtype, ``[1, 1 + gh * gw, D]``. The identity when ``grid == (g, g)``.
  """
  n, d = position_embeddings.shape[1] - 1, position_embeddings.shape[2]
  g = math.isqrt(n)
  if g * g != n:
    raise ValueError(f"DINOv2: {n} patch position embeddings do not form a square grid")
  gh, gw = grid
  if (gh, gw) == (g, g):
    return position_embeddings
  patch = position_embeddings[0, 1:].astype(jnp.float32).reshape(g, g, d)
  mh = jnp.asarray(bicubic_matrix(g, gh, antialias), jnp.float32)
  mw = jnp.asarray(bicubic_matrix(g, gw, antialias), jnp.float32)
  patch = jnp.einsum("hi,ijd,wj->hwd", mh, patch, mw, precision=jax.lax.Precision.HIGHEST)
  patch = patch.reshape(1, gh * gw, d).astype(position_embeddings.dtype)
  return jnp.concatenate([position_embeddings[:, :1], patch], axis=1)


# ---------------------------------------------------------------------------- modules
class Dinov2Output(NamedTuple):
  """What transformers' ``Dinov2Model`` returns (``BaseModelOutputWithPooling``), less the optional extras.

  Attributes:
    last_hidden_state: ``[B, 1 + R + gh * gw, D]`` after the final LayerNorm (CLS, R registers, patches).
    pooler_output: ``[B, D]``, the CLS token of ``last_hidden_state``.
  """

  last_hidden_state: jax.Array
  pooler_output: jax.Array


class Dinov2Embeddings(nn.Module):
  """Patch embedding, CLS token, (interpolated) position embeddings, optional mask and register tokens."""

  hidden_size: int
  patch_size: int
  image_size: int
  num_channels: int = 3
  use_mask_token: bool = True
  num_register_tokens: int = 0
  antialias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels: jax.Array, bool_masked_pos: jax.Array | None = None) -> jax.Array:
    d, p = self.hidden_size, self.patch_size
    g = self.image_size // p
    cls_token = self.param("cls_token", _partitioned(_INIT, (None, None, "embed")), (1, 1, d), self.param_dtype)
    mask_token = None
    if self.use_mask_token:
      mask_token = self.param(
          "mask_token", _partitioned(nn.initializers.zeros_init(), (None, "embed")), (1, d), self.param_dtype
      )
    position = self.param(
        "position_embeddings", _partitioned(_INIT, (None, None, "embed")), (1, 1 + g * g, d), self.param_dtype
    )
    registers = None
    if self.num_register_tokens:
      registers = self.param(
          "register_tokens",
          _partitioned(nn.initializers.zeros_init(), (None, None, "embed")),
          (1, self.num_register_tokens, d),
          self.param_dtype,
      )
    b, h, w = pixels.shape[:3]
    gh, gw = h // p, w // p
    x = nn.Conv(
        d,
        (p, p),
        strides=(p, p),
        padding="VALID",
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=_partitioned(_INIT, (None, None, "conv_in", "embed")),
        bias_init=_partitioned(nn.initializers.zeros_init(), ("embed",)),
        name="patch_embeddings",
    )(pixels[:, : gh * p, : gw * p].astype(self.dtype))
    x = x.reshape(b, gh * gw, d)
    if bool_masked_pos is not None:
      if mask_token is None:
        raise ValueError("DINOv2: bool_masked_pos needs the mask token (config use_mask_token = False)")
      x = jnp.where(bool_masked_pos[..., None], mask_token.astype(self.dtype)[None], x)
    cls = jnp.broadcast_to(cls_token.astype(self.dtype), (b, 1, d))
    x = jnp.concatenate([cls, x], axis=1)
    x = x + interpolate_position_embeddings(position, (gh, gw), self.antialias).astype(self.dtype)
    if registers is not None:
      regs = jnp.broadcast_to(registers.astype(self.dtype), (b, self.num_register_tokens, d))
      x = jnp.concatenate([x[:, :1], regs, x[:, 1:]], axis=1)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class Dinov2Attention(nn.Module):
  """Multi-head self-attention: ``query`` / ``key`` / ``value`` (bias if ``qkv_bias``) and ``output`` projections."""

  num_heads: int
  qkv_bias: bool = True
  attention: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    head_dim = d // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    split = lambda t: t.reshape(b, n, self.num_heads, head_dim)  # noqa: E731
    q = split(_dense(d, ("embed", "heads"), "query", use_bias=self.qkv_bias, **kw)(x))
    k = split(_dense(d, ("embed", "heads"), "key", use_bias=self.qkv_bias, **kw)(x))
    v = split(_dense(d, ("embed", "heads"), "value", use_bias=self.qkv_bias, **kw)(x))
    out = attention_lib.dot_product_attention(q, k, v, backend=self.attention).reshape(b, n, d)
    out = nn.with_logical_constraint(out, ("batch", "length", "heads"))
    return _dense(d, ("heads", "embed"), "output", **kw)(out)


class Dinov2LayerScale(nn.Module):
  """``x * lambda1`` (Touvron et al. 2021, CaiT's LayerScale); ``lambda1`` starts at ``init_value``."""

  init_value: float = 1.0
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.constant(self.init_value)
    lam = self.param("lambda1", _partitioned(init, ("embed",)), (x.shape[-1],), self.param_dtype)
    return x * lam.astype(x.dtype)


class Dinov2MLP(nn.Module):
  """``fc2(act(fc1(x)))``, or with ``swiglu`` ``weights_out(silu(a) * b)``, ``[a, b] = weights_in(x)``."""

  hidden: int
  act: str = "gelu"
  swiglu: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = x.shape[-1]
    if self.swiglu:
      gate, up = jnp.split(_dense(2 * self.hidden, ("embed", "mlp"), "weights_in", **kw)(x), 2, axis=-1)
      h = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
      return _dense(d, ("mlp", "embed"), "weights_out", **kw)(h)
    h = _ACTIVATIONS[self.act](_dense(self.hidden, ("embed", "mlp"), "fc1", **kw)(x))
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    return _dense(d, ("mlp", "embed"), "fc2", **kw)(h)


class Dinov2Layer(nn.Module):
  """Pre-norm residual block with LayerScale on both branches."""

  num_heads: int
  mlp_hidden: int
  act: str = "gelu"
  swiglu: bool = False
  qkv_bias: bool = True
  layerscale_value: float = 1.0
  eps: float = 1e-6
  attention: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    scale = lambda name: Dinov2LayerScale(self.layerscale_value, self.param_dtype, name=name)  # noqa: E731
    h = layers.layer_norm(self.eps, name="norm1", **kw)(x)
    h = Dinov2Attention(self.num_heads, self.qkv_bias, self.attention, name="attention", **kw)(h)
    x = x + scale("layer_scale1")(h)
    h = layers.layer_norm(self.eps, name="norm2", **kw)(x)
    h = Dinov2MLP(self.mlp_hidden, self.act, self.swiglu, name="mlp", **kw)(h)
    x = x + scale("layer_scale2")(h)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class Dinov2Encoder(nn.Module):
  """The stack of :class:`Dinov2Layer` (``layer_0 .. layer_{L-1}``, not scanned)."""

  num_layers: int
  layer: Mapping[str, Any]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_layers):
      x = Dinov2Layer(**self.layer, name=f"layer_{i}")(x)
    return x


class Dinov2Model(nn.Module):
  """DINOv2 ViT: normalised pixels ``[B, H, W, C]`` (channels last) -> :class:`Dinov2Output`.

  Attributes:
    hidden_size: width D (1024 for ViT-L/14).
    num_layers: transformer layers L.
    num_heads: attention heads.
    patch_size: patch p (14 in the releases).
    image_size: the side whose (image_size // p)^2 grid the position embeddings were published for (518 in the
      releases); any other input size is served by interpolation.
    mlp_ratio: MLP width over D (4).
    num_channels: input channels (3).
    eps: LayerNorm epsilon (1e-6).
    act: MLP activation (``gelu``: erf).
    qkv_bias: biases on the q/k/v projections.
    layerscale_value: initial LayerScale (only for random init; a checkpoint replaces it).
    use_swiglu_ffn: SwiGLU MLP (ViT-g/14).
    use_mask_token: the ``mask_token`` parameter exists (for ``bool_masked_pos``).
    num_register_tokens: register tokens R after the CLS token (0: plain DINOv2).
    antialias: antialiased bicubic position interpolation (what ``Dinov2WithRegistersModel`` does).
    attention: attention backend name (:func:`onestory_jax.models.attention.backend_names`).
    dtype: compute dtype (LayerNorm statistics and the interpolation in float32).
    param_dtype: parameter dtype.
  """

  hidden_size: int
  num_layers: int
  num_heads: int
  patch_size: int
  image_size: int
  mlp_ratio: float = 4.0
  num_channels: int = 3
  eps: float = 1e-6
  act: str = "gelu"
  qkv_bias: bool = True
  layerscale_value: float = 1.0
  use_swiglu_ffn: bool = False
  use_mask_token: bool = True
  num_register_tokens: int = 0
  antialias: bool = False
  attention: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _check(self) -> None:
    for field in ("hidden_size", "num_layers", "num_heads", "patch_size", "image_size", "num_channels"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"Dinov2Model: {field} must be a positive int, got {value!r}")
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"Dinov2Model: hidden_size = {self.hidden_size} must be divisible by num_heads = {self.num_heads}"
      )
    if self.image_size < self.patch_size:
      raise ValueError(f"Dinov2Model: image_size = {self.image_size} is smaller than patch_size = {self.patch_size}")
    if not self.mlp_ratio > 0:
      raise ValueError(f"Dinov2Model: mlp_ratio must be positive, got {self.mlp_ratio!r}")
    if self.num_register_tokens < 0:
      raise ValueError(f"Dinov2Model: num_register_tokens must be >= 0, got {self.num_register_tokens!r}")
    if not self.use_swiglu_ffn and self.act not in _ACTIVATIONS:
      raise ValueError(f"Dinov2Model: act must be one of {sorted(_ACTIVATIONS)}, got {self.act!r}")
    attention_lib.check_backend(self.attention)

  @property
  def mlp_hidden(self) -> int:
    if self.use_swiglu_ffn:
      return swiglu_hidden_size(self.hidden_size, self.mlp_ratio)
    return int(self.hidden_size * self.mlp_ratio)

  def num_tokens(self, height: int, width: int) -> int:
    """Sequence length for an input of (height, width) pixels: 1 + R + (height // p) * (width // p)."""
    p = self.patch_size
    return 1 + self.num_register_tokens + (height // p) * (width // p)

  @nn.compact
  def __call__(self, pixels: jax.Array, bool_masked_pos: jax.Array | None = None) -> Dinov2Output:
    """Runs the tower.

    Args:
      pixels: ``[B, H, W, C]`` normalised pixels (ImageNet mean / std), channels last, H, W >= patch_size.
      bool_masked_pos: optional ``[B, (H // p) * (W // p)]`` bool; True patches are replaced by the mask token.

    Returns:
      :class:`Dinov2Output` (``last_hidden_state [B, 1 + R + gh * gw, D]``, ``pooler_output [B, D]``).
    """
    self._check()
    p, c = self.patch_size, self.num_channels
    if pixels.ndim != 4 or pixels.shape[-1] != c or pixels.shape[1] < p or pixels.shape[2] < p:
      raise ValueError(
          f"Dinov2Model: pixels must be [B, H, W, {c}] (normalised, channels last, H and W >= {p}), got shape "
          f"{tuple(pixels.shape)}"
      )
    grid = (pixels.shape[1] // p) * (pixels.shape[2] // p)
    if bool_masked_pos is not None and tuple(bool_masked_pos.shape) != (pixels.shape[0], grid):
      raise ValueError(
          f"Dinov2Model: bool_masked_pos must be [B, {grid}] (one entry per patch), got shape "
          f"{tuple(bool_masked_pos.shape)}"
      )
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = Dinov2Embeddings(
        self.hidden_size,
        p,
        self.image_size,
        c,
        self.use_mask_token,
        self.num_register_tokens,
        self.antialias,
        name="embeddings",
        **kw,
    )(pixels, bool_masked_pos)
    layer = dict(
        num_heads=self.num_heads,
        mlp_hidden=self.mlp_hidden,
        act=self.act,
        swiglu=self.use_swiglu_ffn,
        qkv_bias=self.qkv_bias,
        layerscale_value=self.layerscale_value,
        eps=self.eps,
        attention=self.attention,
        **kw,
    )
    x = Dinov2Encoder(self.num_layers, layer, name="encoder")(x)
    x = layers.layer_norm(self.eps, name="layernorm", **kw)(x)
    return Dinov2Output(x, x[:, 0])


# ---------------------------------------------------------------------------- published configs
_FIELDS = {  # our field -> transformers Dinov2Config field
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
}
_MODEL_TYPES = ("dinov2", "dinov2_with_registers")


def _square(cfg: Mapping[str, Any], field: str, default: int) -> int:
  value = cfg.get(field, default)
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ValueError(f"DINOv2 config: field {field!r} must be an int or a square [n, n], got {value!r}")
    value = value[0]
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"DINOv2 config: field {field!r} must be a positive int, got {value!r}")
  return value


def config_from_transformers(cfg: Mapping[str, Any]) -> dict:
  """:class:`Dinov2Model` fields from a transformers ``Dinov2Config`` / ``Dinov2WithRegistersConfig`` dict.

  Fields absent from ``config.json`` take transformers' defaults (``image_size`` 224, ``patch_size`` 14 for
  ``dinov2`` and 16 for ``dinov2_with_registers``, ``mlp_ratio`` 4, ``layer_norm_eps`` 1e-6, ``hidden_act`` gelu,
  ``qkv_bias`` True, ``layerscale_value`` 1, ``use_swiglu_ffn`` False, ``use_mask_token`` True, 4 registers).
  ``dinov2_with_registers`` always has the mask token and interpolates position embeddings with antialiasing.

  Raises:
    ValueError: wrong ``model_type``, a missing or invalid size field, or an unsupported activation.
  """
  if not isinstance(cfg, Mapping):
    raise ValueError(f"DINOv2 config: expected a dict (config.json), got {type(cfg).__name__}")
  model_type = cfg.get("model_type")
  if model_type not in _MODEL_TYPES:
    raise ValueError(f"DINOv2 config: model_type must be one of {list(_MODEL_TYPES)}, got {model_type!r}")
  registers = model_type == "dinov2_with_registers"
  out: dict[str, Any] = dict(weights.positive_int_fields(cfg, _FIELDS, "DINOv2 config"))
  out["patch_size"] = _square(cfg, "patch_size", 16 if registers else 14)
  out["image_size"] = _square(cfg, "image_size", 224)
  ratio = cfg.get("mlp_ratio", 4)
  if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0:
    raise ValueError(f"DINOv2 config: field 'mlp_ratio' must be a positive number, got {ratio!r}")
  out["mlp_ratio"] = float(ratio)
  out["num_channels"] = int(cfg.get("num_channels", 3))
  out["eps"] = float(cfg.get("layer_norm_eps", 1e-6))
  out["use_swiglu_ffn"] = bool(cfg.get("use_swiglu_ffn", False))
  act = cfg.get("hidden_act", "gelu")
  if not out["use_swiglu_ffn"] and act not in _ACTIVATIONS:
    raise ValueError(f"DINOv2 config: hidden_act must be one of {sorted(_ACTIVATIONS)}, got {act!r}")
  out["act"] = act
  out["qkv_bias"] = bool(cfg.get("qkv_bias", True))
  out["layerscale_value"] = float(cfg.get("layerscale_value", 1.0))
  out["use_mask_token"] = True if registers else bool(cfg.get("use_mask_token", True))
  reg = int(cfg.get("num_register_tokens", 4)) if registers else 0
  if reg < 0:
    raise ValueError(f"DINOv2 config: num_register_tokens must be >= 0, got {reg}")
  out["num_register_tokens"] = reg
  out["antialias"] = registers
  return out


def dinov2_from_transformers(cfg: Mapping[str, Any], **kwargs) -> Dinov2Model:
  """The :class:`Dinov2Model` that a transformers config dict describes (``kwargs``: dtype, attention, ...)."""
  return Dinov2Model(**config_from_transformers(cfg), **kwargs)


def abstract_params(module: Dinov2Model, *, boxed: bool = False) -> Any:
  """Abstract parameter tree of ``module`` (``jax.ShapeDtypeStruct`` leaves; nothing is allocated)."""
  s = module.image_size
  pixels = jax.ShapeDtypeStruct((1, s, s, module.num_channels), jnp.float32)
  params = jax.eval_shape(module.init, jax.random.key(0), pixels)["params"]
  return params if boxed else sharding.strip_boxes(params)


def abstract_params_from_transformers(cfg: Mapping[str, Any], *, boxed: bool = False, param_dtype: Any = jnp.float32):
  """Abstract parameter tree of the tower that a DINOv2 ``config.json`` describes (the converter's entry point)."""
  return abstract_params(dinov2_from_transformers(cfg, param_dtype=param_dtype), boxed=boxed)


# ---------------------------------------------------------------------------- published weights
_PREFIXES = ("dinov2.", "dinov2_with_registers.")  # the backbone inside *ForImageClassification checkpoints
_EMBEDDING_PARAMS = ("cls_token", "mask_token", "position_embeddings", "register_tokens")
_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)")
_LAYER_MODULES = {  # transformers module inside a layer -> our path inside encoder/layer_N
    "attention.attention.query": ("attention", "query"),
    "attention.attention.key": ("attention", "key"),
    "attention.attention.value": ("attention", "value"),
    "attention.output.dense": ("attention", "output"),
    "norm1": ("norm1",),
    "norm2": ("norm2",),
    "mlp.fc1": ("mlp", "fc1"),
    "mlp.fc2": ("mlp", "fc2"),
    "mlp.weights_in": ("mlp", "weights_in"),
    "mlp.weights_out": ("mlp", "weights_out"),
}
_NORMS = ("norm1", "norm2")


def torch_key_to_target(name: str) -> weights.Target | None:
  """Where one tensor of a saved transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel`` goes.

  Names may carry the ``dinov2.`` / ``dinov2_with_registers.`` prefix of the image-classification checkpoints, whose
  ``classifier.*`` head is skipped (None). Linear weights become ``[in, out]`` kernels, the patch convolution a
  ``[p, p, C, D]`` kernel; token and position parameters keep their shapes.

  Raises:
    ValueError: for any other name, naming the key.
  """
  if name.startswith("classifier."):
    return None
  key = name
  for prefix in _PREFIXES:
    if key.startswith(prefix):
      key = key[len(prefix) :]
      break
  if key.startswith("embeddings.") and key[len("embeddings.") :] in _EMBEDDING_PARAMS:
    return weights.Target(("embeddings", key[len("embeddings.") :]))
  if key == "embeddings.patch_embeddings.projection.weight":
    return weights.Target(("embeddings", "patch_embeddings", "kernel"), weights.conv)
  if key == "embeddings.patch_embeddings.projection.bias":
    return weights.Target(("embeddings", "patch_embeddings", "bias"))
  if key in ("layernorm.weight", "layernorm.bias"):
    return weights.Target(("layernorm", "scale" if key.endswith("weight") else "bias"))
  m = _LAYER.fullmatch(key)
  if m:
    layer, module, kind = f"layer_{int(m.group(1))}", m.group(2), m.group(3)
    if module in ("layer_scale1", "layer_scale2") and kind == "lambda1":
      return weights.Target(("encoder", layer, module, "lambda1"))
    if module in _LAYER_MODULES and kind != "lambda1":
      path = ("encoder", layer) + _LAYER_MODULES[module]
      if kind == "bias":
        return weights.Target(path + ("bias",))
      if module in _NORMS:
        return weights.Target(path + ("scale",))
      return weights.Target(path + ("kernel",), weights.linear)
  raise ValueError(
      f"DINOv2 checkpoint: unknown tensor name {name!r} (expected a saved Dinov2Model parameter: embeddings.*, "
      "encoder.layer.{i}.{attention.attention.query|key|value, attention.output.dense, norm1, norm2, layer_scale1, "
      "layer_scale2, mlp.fc1|fc2|weights_in|weights_out}.*, layernorm.*)"
  )


def target_to_torch_key(path: tuple[str, ...]) -> str:
  """The saved transformers name of a parameter of :class:`Dinov2Model` (the inverse of :func:`torch_key_to_target`).

  Used to name the keys a checkpoint lacks.
  """
  path = tuple(path)
  if path[0] == "embeddings" and len(path) == 2:
    return f"embeddings.{path[1]}"
  if path[:2] == ("embeddings", "patch_embeddings"):
    return f"embeddings.patch_embeddings.projection.{'weight' if path[-1] == 'kernel' else path[-1]}"
  if path[0] == "layernorm":
    return f"layernorm.{'weight' if path[-1] == 'scale' else path[-1]}"
  if path[0] == "encoder" and len(path) >= 4 and path[1].startswith("layer_"):
    prefix = f"encoder.layer.{path[1][len('layer_'):]}"
    if path[2].startswith("layer_scale"):
      return f"{prefix}.{path[2]}.lambda1"
    inverse = {v: k for k, v in _LAYER_MODULES.items()}
    module = inverse.get(tuple(path[2:-1]))
    if module is not None:
      return f"{prefix}.{module}.{'bias' if path[-1] == 'bias' else 'weight'}"
  return "/".join(path)


def plan_errors(
    plan: weights.ConversionPlan,
    name_of: Callable[[tuple[str, ...]], str] = weights.path_str,
    tensors: Mapping[str, weights.TensorInfo] | None = None,
) -> str:
  """Readable lines for a failed :class:`onestory_jax.weights.ConversionPlan`, missing keys under published names.

  ``name_of`` maps a destination path to the published name that should have filled it; ``tensors`` (the index the
  plan was made from) adds the stored shape of a mis-shaped tensor. A destination whose tensor has the wrong shape is
  listed under the shape mismatches only, not also as missing.
  """
  lines = []

  def block(title, items):
    if items:
      lines.append(f"  {title} ({len(items)}):")
      lines.extend(f"    {x}" for x in items[:20])
      if len(items) > 20:
        lines.append(f"    ... {len(items) - 20} more")

  misshaped = {t for _, t, _, _ in plan.shape_mismatches}
  missing = []
  for entry in plan.missing:
    if entry not in misshaped:
      missing.append(f"{name_of(tuple(entry.split('[')[0].split('/')))} (-> {entry})")
  block("missing keys", missing)
  block("unexpected keys", [f"{k}: {r}" for k, r in plan.unexpected])
  mismatches = []
  for k, t, e, g in plan.shape_mismatches:
    stored = f" (stored {list(tensors[k].shape)})" if tensors and k in tensors else ""
    mismatches.append(f"{k} -> {t}: expected {list(e)}, got {list(g)}{stored} in the model's layout")
  block("shape mismatches", mismatches)
  block("conflicts", [f"{k}: {r}" for k, r in plan.conflicts])
  return "\n".join(lines)


def load_safetensors_params(
    directory: str,
    key_map: weights.KeyMap,
    abstract: Any,
    *,
    stem: str = "model",
    what: str = "checkpoint",
    name_of: Callable[[tuple[str, ...]], str] = weights.path_str,
    dtype: Any = None,
) -> dict:
  """Reads a transformers / diffusers safetensors directory into a parameter tree shaped like ``abstract``.

  Every key and shape is checked first (:func:`onestory_jax.weights.plan_conversion`, headers only); then tensors
  are read one at a time (never unpickled) and converted by the key map's transforms. Leaves are jax arrays of
  ``dtype`` (default: the dtype of ``abstract``'s leaf).

  Raises:
    ValueError: no weight files (naming what was expected), or keys / shapes that do not fit ``abstract``, naming
      every missing key (as ``name_of`` spells it), unexpected key and mis-shaped key.
  """
  tensors = weights.index_safetensors(directory, stem)
  plan = weights.plan_conversion(tensors, key_map, abstract)
  if not plan.ok:
    raise ValueError(
        f"{directory}: the {what} does not match the model of its config.json:\n{plan_errors(plan, name_of, tensors)}"
    )
  leaves = weights.flatten_tree(abstract)
  flat = {}
  for path, slot in plan.slots.items():
    want = jnp.dtype(dtype if dtype is not None else leaves[path].dtype)
    if slot.stacked:
      value = np.stack([t(weights.read_tensor(info)) for info, t in (slot.sources[i] for i in range(slot.shape[0]))])
    else:
      info, transform = slot.sources[None]
      value = transform(weights.read_tensor(info))
    if tuple(value.shape) != tuple(slot.shape):
      raise ValueError(f"{directory}: {weights.path_str(path)} has shape {list(value.shape)}, expected {slot.shape}")
    flat[path] = jnp.asarray(value, want)
  return weights.unflatten_tree(flat)


def read_config(directory: str) -> dict:
  """``directory/config.json`` as a dict; ValueError naming the file when it is absent or not a JSON object."""
  path = os.path.join(directory, "config.json")
  if not os.path.isdir(directory):
    raise ValueError(f"{directory}: not a directory (expected a release folder with config.json and model.safetensors)")
  if not os.path.isfile(path):
    raise ValueError(f"{path}: missing (a transformers save_pretrained folder has config.json and model.safetensors)")
  try:
    with open(path) as f:
      cfg = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(cfg, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
  return cfg


def load_dinov2(
    path: str, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, attention: str = "xla"
) -> tuple[Dinov2Model, dict]:
  """Loads a DINOv2 release folder (transformers ``save_pretrained``: config.json + model.safetensors).

  Args:
    path: the folder; sharded weights (``model.safetensors.index.json``) work too. Pickles are never read.
    dtype: compute dtype of the returned module.
    param_dtype: dtype of the returned parameters.
    attention: attention backend of the module.

  Returns:
    ``(module, params)``: ``module.apply({'params': params}, pixels)`` gives a :class:`Dinov2Output`.

  Raises:
    ValueError: a missing or malformed config.json or weight file (naming the file and what was expected), a config
      this port does not compute, or a checkpoint whose keys or shapes do not match the config (naming the keys).
  """
  cfg = read_config(path)
  try:
    module = dinov2_from_transformers(cfg, dtype=dtype, param_dtype=param_dtype, attention=attention)
    abstract = abstract_params(module)
  except ValueError as e:
    raise ValueError(f"{os.path.join(path, 'config.json')}: {e}") from e
  params = load_safetensors_params(
      path, torch_key_to_target, abstract, what="DINOv2 checkpoint", name_of=target_to_torch_key
  )
  return module, params
