r"""The Wan video VAE (Wan2.1 and Wan2.2) in Flax Linen, with chunked causal encoding and decoding.

Reference semantics: diffusers' ``AutoencoderKLWan`` (``autoencoder_kl_wan.py``), which covers

* Wan2.1's VAE: ``base_dim`` 96, ``z_dim`` 16, ``dim_mult`` (1, 2, 4, 4), 2 residual blocks per level, temporal
  downsampling (False, True, True): stride (4, 8, 8);
* Wan2.2's VAE (TI2V-5B): ``base_dim`` 160, ``decoder_base_dim`` 256, ``z_dim`` 48, residual down / up blocks
  (``is_residual``) and a 2x2 pixel patchify (``patch_size`` 2, 12 input channels): stride (4, 16, 16).

OneStory (arXiv 2512.07802, Sec. 3) runs its DiT on these latents: every shot is encoded once, the memory bank keeps
the latents, and Frame Selection / the Adaptive Conditioner read them directly (Wan2.1: 16 channels, stride 4x8x8).

Data are channels-last: videos ``[B, T, H, W, C]``, latents ``[B, F, h, w, z]``.

Building blocks (all convolutions are "causal" in time: zero padding on the left only, never on the right):

* causal 3D conv, kernel (3, 3, 3): 2 frames of left context, spatial zero padding 1;
* RMS norm over channels (:class:`ChannelL2Norm`): ``x / max(|x|_2, 1e-12) * sqrt(C) * gamma`` (no bias);
* residual block: RMS-SiLU-conv-RMS-SiLU-conv plus a 1x1x1 shortcut conv when the width changes;
* middle block: residual, single-head spatial self-attention within each frame, residual;
* resampling: ``downsample2d`` (pad right / bottom by 1, 3x3 conv, stride 2), ``downsample3d`` (the same, then a
  temporal conv of kernel 3 and stride 2 over [last frame of the previous chunk, this chunk]), ``upsample2d``
  (nearest x2, 3x3 conv), ``upsample3d`` (a causal temporal conv that doubles the channels, interleaved into twice
  the frames, then as ``upsample2d``);
* Wan2.2 only: a parameter-free shortcut around each down block (space/time-to-channel then a group mean,
  ``AvgDown3D``) and around each up block (channel repeat then channel-to-space/time, ``DupUp3D``).

Causal schedule and cache. The reference encodes frame 0 alone and then 4 frames per chunk (T = 1 + 4k frames ->
1 + k latent frames) and decodes one latent frame per chunk (chunk 0 -> 1 frame, then 4 frames each). Every causal
conv keeps the last frames of its input stream in a feature cache. Here the cache is an explicit pytree (nested
dicts mirroring the module tree) returned by each chunk call and passed to the next; ``cache=None`` starts a new
stream (the reference's first chunk). Caches always hold 2 frames (1 for ``downsample3d``): where the reference
keeps a single frame after the first chunk, the missing frame is a zero, which is exactly the padding the reference
applies, so every later chunk has identical shapes and the chunks after the first run in one ``lax.scan`` body.
Two first-chunk rules of the reference are kept: ``downsample3d`` passes the first chunk through without its
temporal conv, and ``upsample3d`` skips its temporal conv (and frame doubling) on the first chunk, its stream then
starting from zeros at chunk 1.

Long shots: :func:`encode` / :func:`decode` scan over the chunks, holding one chunk's activations plus the cache;
callers that stream frames themselves use :meth:`WanVAE.encode_chunk` / :meth:`WanVAE.decode_chunk` directly.

Outputs: :func:`encode` returns the posterior mean (``DiagonalGaussianDistribution.mode``: the first ``z_dim``
channels of ``quant_conv``'s output); :func:`decode` clamps to [-1, 1] (``clip_output``). The DiT works on
normalised latents, ``(mean - latents_mean) / latents_std`` per channel, as Wan pipelines do (:func:`normalize`,
:func:`denormalize`).

Weights: :func:`torch_key_to_target` maps every tensor name of a diffusers ``AutoencoderKLWan`` state dict to its
Flax path; module names mirror diffusers' (an index joins its list's name: ``down_blocks.0`` -> ``down_blocks_0``;
leaves ``kernel`` / ``bias`` / ``scale``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from onestory_jax import sharding
from onestory_jax import weights

Array = jax.Array
Cache = Any  # nested dict of arrays; None before the first chunk

CHUNK_FRAMES = 4  # pixel frames per encoder chunk after the first (the reference's schedule)
CONTEXT = 2  # frames of left context of a causal conv with temporal kernel 3
_EPS = 1e-12  # torch.nn.functional.normalize

WAN21_LATENTS_MEAN = (
    -0.7571,
    -0.7089,
    -0.9113,
    0.1075,
    -0.1745,
    0.9653,
    -0.1517,
    1.5508,
    0.4134,
    -0.0715,
    0.5517,
    -0.3632,
    -0.1922,
    -0.9497,
    0.2503,
    -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184,
    1.4541,
    2.3275,
    2.6558,
    1.2196,
    1.7708,
    2.6052,
    2.0743,
    3.2687,
    2.1526,
    2.8652,
    1.5579,
    1.6382,
    1.1253,
    2.8251,
    1.9160,
)
WAN22_LATENTS_MEAN = (
    -0.2289,
    -0.0052,
    -0.1323,
    -0.2339,
    -0.2799,
    0.0174,
    0.1838,
    0.1557,
    -0.1382,
    0.0542,
    0.2813,
    0.0891,
    0.1570,
    -0.0098,
    0.0375,
    -0.1825,
    -0.2246,
    -0.1207,
    -0.0698,
    0.5109,
    0.2665,
    -0.2108,
    -0.2158,
    0.2502,
    -0.2055,
    -0.0322,
    0.1109,
    0.1567,
    -0.0729,
    0.0899,
    -0.2799,
    -0.1230,
    -0.0313,
    -0.1649,
    0.0117,
    0.0723,
    -0.2839,
    -0.2083,
    -0.0520,
    0.3748,
    0.0152,
    0.1957,
    0.1433,
    -0.2944,
    0.3573,
    -0.0548,
    -0.1681,
    -0.0667,
)
WAN22_LATENTS_STD = (
    0.4765,
    1.0364,
    0.4514,
    1.1677,
    0.5313,
    0.4990,
    0.4818,
    0.5013,
    0.8158,
    1.0344,
    0.5894,
    1.0901,
    0.6885,
    0.6165,
    0.8454,
    0.4978,
    0.5759,
    0.3523,
    0.7135,
    0.6804,
    0.5833,
    1.4146,
    0.8986,
    0.5659,
    0.7069,
    0.5338,
    0.4889,
    0.4917,
    0.4069,
    0.4999,
    0.6866,
    0.4093,
    0.5709,
    0.6065,
    0.6415,
    0.4944,
    0.5726,
    1.2042,
    0.5458,
    1.6887,
    0.3971,
    1.0600,
    0.3943,
    0.5537,
    0.5444,
    0.4089,
    0.7468,
    0.7744,
)


# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
  """Sizes of a Wan VAE; field names and defaults follow diffusers' ``AutoencoderKLWan`` config (Wan2.1)."""

  base_dim: int = 96
  decoder_base_dim: int = 96
  z_dim: int = 16
  dim_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attn_scales: tuple[float, ...] = ()
  temperal_downsample: tuple[bool, ...] = (False, True, True)
  is_residual: bool = False
  in_channels: int = 3
  out_channels: int = 3
  patch_size: int = 1
  latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
  latents_std: tuple[float, ...] = WAN21_LATENTS_STD
  clip_output: bool = True

  def __post_init__(self):
    for f in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
      object.__setattr__(self, f, tuple(getattr(self, f)))  # hashable: configs key jit caches
    for f in ("base_dim", "decoder_base_dim", "z_dim", "num_res_blocks", "in_channels", "out_channels", "patch_size"):
      v = getattr(self, f)
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
        raise ValueError(f"WanVAEConfig.{f}: expected a positive int, got {v!r}")
    mult = tuple(self.dim_mult)
    if not mult or not all(isinstance(m, (int, np.integer)) and m >= 1 for m in mult):
      raise ValueError(f"WanVAEConfig.dim_mult: expected positive ints, got {self.dim_mult!r}")
    if len(self.temperal_downsample) != len(mult) - 1:
      raise ValueError(
          f"WanVAEConfig.temperal_downsample: expected {len(mult) - 1} flags (one per downsampling "
          f"level of dim_mult {mult}), got {self.temperal_downsample!r}"
      )
    if self.attn_scales:
      raise ValueError(
          f"WanVAEConfig.attn_scales: expected [] (every published Wan VAE; diffusers' AutoencoderKLWan "
          f"cannot run attention inside its down blocks either), got {self.attn_scales!r}"
      )
    if sum(bool(t) for t in self.temperal_downsample) != 2:
      raise ValueError(
          "WanVAEConfig.temperal_downsample: the chunked causal schedule (frame 0, then 4 frames per "
          f"chunk) needs exactly 2 temporal downsamplings (stride 4), got {self.temperal_downsample!r}"
      )
    p2 = self.patch_size**2
    if self.in_channels % p2 or self.out_channels % p2:
      raise ValueError(
          f"WanVAEConfig.in_channels / out_channels ({self.in_channels}, {self.out_channels}) must be "
          f"divisible by patch_size**2 = {p2}"
      )
    if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
      raise ValueError(
          f"WanVAEConfig.latents_mean / latents_std: expected {self.z_dim} values each (z_dim), got "
          f"{len(self.latents_mean)} and {len(self.latents_std)}"
      )
    if min(self.latents_std) <= 0:
      raise ValueError("WanVAEConfig.latents_std: every value must be positive")
    if self.is_residual:
      dims = [self.base_dim * m for m in (1,) + mult]
      for i in range(len(mult) - 1):
        factor = (2 if self.temperal_downsample[i] else 1) * 4
        if dims[i] * factor % dims[i + 1]:
          raise ValueError(
              f"WanVAEConfig: residual down block {i}: in_dim {dims[i]} x factor {factor} must be "
              f"divisible by out_dim {dims[i + 1]} (AvgDown3D)"
          )
      ddims = [self.decoder_base_dim * m for m in (mult[-1],) + mult[::-1]]
      up_t = self.temperal_downsample[::-1]
      for i in range(len(mult) - 1):
        factor = (2 if up_t[i] else 1) * 4
        if ddims[i + 1] * factor % ddims[i]:
          raise ValueError(
              f"WanVAEConfig: residual up block {i}: out_dim {ddims[i + 1]} x factor {factor} must be "
              f"divisible by in_dim {ddims[i]} (DupUp3D)"
          )

  @property
  def stride_t(self) -> int:
    return 2 ** sum(bool(t) for t in self.temperal_downsample)

  @property
  def stride_hw(self) -> int:
    return 2 ** (len(self.dim_mult) - 1) * self.patch_size

  @property
  def stride(self) -> tuple[int, int, int]:
    return self.stride_t, self.stride_hw, self.stride_hw

  @property
  def video_channels(self) -> int:
    """Channels of the pixel video (before patchify): 3 for both published VAEs."""
    return self.in_channels // self.patch_size**2


PRESETS = {
    "wan2.1": WanVAEConfig(),
    "wan2.2": WanVAEConfig(
        base_dim=160,
        decoder_base_dim=256,
        z_dim=48,
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        latents_mean=WAN22_LATENTS_MEAN,
        latents_std=WAN22_LATENTS_STD,
    ),
}

_DIFFUSERS_KEYS = (
    "base_dim",
    "decoder_base_dim",
    "z_dim",
    "dim_mult",
    "num_res_blocks",
    "attn_scales",
    "temperal_downsample",
    "dropout",
    "latents_mean",
    "latents_std",
    "is_residual",
    "in_channels",
    "out_channels",
    "patch_size",
    "scale_factor_temporal",
    "scale_factor_spatial",
    "clip_output",
)


def config_from_diffusers(cfg: Mapping[str, Any]) -> WanVAEConfig:
  """Module sizes from a diffusers ``AutoencoderKLWan`` ``config.json`` dict.

  Missing keys take diffusers' defaults (Wan2.1's VAE); keys starting with ``_`` (``_class_name``, ...) are ignored.
  ``dropout`` only matters for training and is ignored (inference is deterministic). ``scale_factor_temporal`` /
  ``scale_factor_spatial`` are checked against the stride the architecture implies.

  Raises:
    ValueError: on an unknown key, a scale factor that contradicts the architecture, or invalid sizes.
  """
  unknown = sorted(k for k in cfg if not k.startswith("_") and k not in _DIFFUSERS_KEYS)
  if unknown:
    raise ValueError(
        f"config_from_diffusers: unknown AutoencoderKLWan config keys {unknown}; known: "
        f"{', '.join(_DIFFUSERS_KEYS)}"
    )
  d = WanVAEConfig()
  get = lambda k, default: default if cfg.get(k) is None else cfg[k]  # noqa: E731
  base = int(get("base_dim", d.base_dim))
  out = WanVAEConfig(
      base_dim=base,
      decoder_base_dim=int(get("decoder_base_dim", base)),
      z_dim=int(get("z_dim", d.z_dim)),
      dim_mult=tuple(int(m) for m in get("dim_mult", d.dim_mult)),
      num_res_blocks=int(get("num_res_blocks", d.num_res_blocks)),
      attn_scales=tuple(float(s) for s in get("attn_scales", d.attn_scales)),
      temperal_downsample=tuple(bool(t) for t in get("temperal_downsample", d.temperal_downsample)),
      is_residual=bool(get("is_residual", d.is_residual)),
      in_channels=int(get("in_channels", d.in_channels)),
      out_channels=int(get("out_channels", d.out_channels)),
      patch_size=int(get("patch_size", 1)),
      latents_mean=tuple(float(v) for v in get("latents_mean", d.latents_mean)),
      latents_std=tuple(float(v) for v in get("latents_std", d.latents_std)),
      clip_output=bool(get("clip_output", True)),
  )
  for key, want in (("scale_factor_temporal", out.stride_t), ("scale_factor_spatial", out.stride_hw)):
    if cfg.get(key) is not None and int(cfg[key]) != want:
      raise ValueError(
          f"config_from_diffusers: {key} = {cfg[key]} contradicts the architecture (dim_mult, "
          f"temperal_downsample, patch_size imply {want})"
      )
  return out


# ----------------------------------------------------------------------------- layers


@dataclasses.dataclass(frozen=True)
class Numerics:
  """Compute dtype, parameter dtype and conv / matmul precision shared by every layer.

  RMS norms and the attention softmax always run in float32. For float32 parity on accelerators pass
  ``precision=jax.lax.Precision.HIGHEST`` (the codec does); CPU computes float32 exactly either way.
  """

  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  precision: Any = None


# PyTorch's default conv initialisation (kaiming-uniform, a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_TORCH_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # keep in sync with init()


def _conv(
    features: int, kernel: Sequence[int], name: str, num: Numerics, *, strides=None, padding: Any = "VALID"
) -> nn.Conv:
  n = len(kernel)
  return nn.Conv(
      features,
      tuple(kernel),
      strides=strides,
      padding=padding,
      dtype=num.dtype,
      param_dtype=num.param_dtype,
      precision=num.precision,
      kernel_init=nn.with_logical_partitioning(_TORCH_INIT, (None,) * n + ("conv_in", "conv_out")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
      name=name,
  )


def _causal(conv: nn.Conv, x: Array, cache: Array | None) -> tuple[Array, Array]:
  """Temporal-kernel-3 causal conv over ``[cache (2 frames, zeros at the start), x]``; new cache = last 2 frames."""
  if cache is None:
    cache = jnp.zeros(x.shape[:1] + (CONTEXT,) + x.shape[2:], x.dtype)
  xc = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
  return conv(xc), xc[:, -CONTEXT:]


def _conv3(features: int, name: str, num: Numerics) -> nn.Conv:
  """The reference's ``WanCausalConv3d(in, out, 3, padding=1)`` without its time padding (see :func:`_causal`)."""
  return _conv(features, (3, 3, 3), name, num, padding=((0, 0), (1, 1), (1, 1)))


def _sub(cache: Cache, name: str) -> Cache:
  return None if cache is None else cache.get(name)


class ChannelL2Norm(nn.Module):
  """``WanRMS_norm`` over the channel axis: ``x / max(|x|_2, 1e-12) * sqrt(C) * scale`` (normalised in float32).

  An L2 normalisation of each position's channel vector (``F.normalize``), rescaled by ``sqrt(C)``: an RMS norm
  without epsilon (the 1e-12 only clamps ``|x|_2`` away from zero), not T5's, which adds its epsilon to the mean
  square inside the root (:class:`onestory_jax.models.wan.umt5.RMSNorm`). Its scale is partitioned on 'conv_in'.
  """

  num: Numerics = Numerics()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("conv_in",)), (c,), self.num.param_dtype
    )
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
    y = (x32 / jnp.maximum(norm, _EPS)).astype(self.num.dtype)
    return y * (math.sqrt(c) * scale).astype(self.num.dtype)


class ResidualBlock(nn.Module):
  """``WanResidualBlock``: ``conv2(silu(norm2(conv1(silu(norm1(x)))))) + shortcut(x)``, causal convs cached."""

  in_dim: int
  out_dim: int
  num: Numerics = Numerics()

  @nn.compact
  def __call__(self, x: Array, cache: Cache = None) -> tuple[Array, Cache]:
    if x.shape[-1] != self.in_dim:
      raise ValueError(f"ResidualBlock: expected {self.in_dim} input channels, got {x.shape[-1]}")
    h = (
        _conv(self.out_dim, (1, 1, 1), "conv_shortcut", self.num)(x)
        if self.in_dim != self.out_dim
        else x.astype(self.num.dtype)
    )
    y = nn.silu(ChannelL2Norm(self.num, name="norm1")(x))
    y, c1 = _causal(_conv3(self.out_dim, "conv1", self.num), y, _sub(cache, "conv1"))
    y = nn.silu(ChannelL2Norm(self.num, name="norm2")(y))
    y, c2 = _causal(_conv3(self.out_dim, "conv2", self.num), y, _sub(cache, "conv2"))
    return y + h, {"conv1": c1, "conv2": c2}


class AttentionBlock(nn.Module):
  """``WanAttentionBlock``: single-head self-attention over the pixels of each frame (no cache: per frame)."""

  num: Numerics = Numerics()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, t, h, w, c = x.shape
    y = ChannelL2Norm(self.num, name="norm")(x)
    qkv = _conv(3 * c, (1, 1), "to_qkv", self.num)(y).reshape(b * t, h * w, 3 * c)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    logits = jnp.einsum("nqc,nkc->nqk", q, k, precision=self.num.precision) / math.sqrt(c)
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    o = jnp.einsum("nqk,nkc->nqc", p, v, precision=self.num.precision).reshape(b, t, h, w, c)
    return x.astype(self.num.dtype) + _conv(c, (1, 1), "proj", self.num)(o)


class Resample(nn.Module):
  """``WanResample``: spatial (and, for the 3d modes, temporal) down- or upsampling by 2.

  Cache: ``upsample3d`` keeps 2 frames of its temporal conv's input, ``downsample3d`` the last frame of its input.
  """

  dim: int
  mode: str  # downsample2d | downsample3d | upsample2d | upsample3d
  out_dim: int | None = None  # upsampling only; the reference defaults to dim // 2
  num: Numerics = Numerics()

  @nn.compact
  def __call__(self, x: Array, cache: Cache = None) -> tuple[Array, Cache]:
    if self.mode not in ("downsample2d", "downsample3d", "upsample2d", "upsample3d"):
      raise ValueError(
          f"Resample.mode: expected downsample2d | downsample3d | upsample2d | upsample3d, got " f"{self.mode!r}"
      )
    new_cache = None
    if self.mode == "upsample3d":
      if cache is None:  # first chunk: no temporal upsampling; the conv's stream starts at the next chunk from zeros
        b, _, h, w, c = x.shape
        new_cache = jnp.zeros((b, CONTEXT, h, w, c), self.num.dtype)
        x = x.astype(self.num.dtype)
      else:
        conv = _conv(2 * self.dim, (3, 1, 1), "time_conv", self.num)
        y, new_cache = _causal(conv, x, cache["time_conv"])
        x = einops.rearrange(y, "b t h w (i c) -> b (t i) h w c", i=2)  # channel block i -> frame 2t + i
      new_cache = {"time_conv": new_cache}
    if self.mode.startswith("upsample"):
      x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest(-exact) x2
      conv = _conv(self.out_dim or self.dim // 2, (3, 3), "resample_1", self.num, padding=((1, 1), (1, 1)))
      return conv(x), new_cache
    x = _conv(self.dim, (3, 3), "resample_1", self.num, strides=(2, 2), padding=((0, 1), (0, 1)))(x)
    if self.mode == "downsample3d":
      last = x[:, -1:]
      if cache is not None:  # the first chunk passes through without the temporal conv
        conv = _conv(self.dim, (3, 1, 1), "time_conv", self.num, strides=(2, 1, 1))
        x = conv(jnp.concatenate([cache["time_conv"].astype(x.dtype), x], axis=1))
      new_cache = {"time_conv": last}
    return x, new_cache


def avg_down(x: Array, out_dim: int, factor_t: int, factor_s: int) -> Array:
  """``AvgDown3D``: left-pad time to a multiple of ``factor_t``, fold (t, h, w) blocks into channels, group-mean."""
  pad_t = (-x.shape[1]) % factor_t
  if pad_t:
    x = jnp.pad(x, ((0, 0), (pad_t, 0), (0, 0), (0, 0), (0, 0)))
  x = einops.rearrange(x, "b (t a) (h p) (w q) c -> b t h w (c a p q)", a=factor_t, p=factor_s, q=factor_s)
  return einops.reduce(x, "b t h w (o g) -> b t h w o", "mean", o=out_dim)


def dup_up(x: Array, out_dim: int, factor_t: int, factor_s: int, first_chunk: bool) -> Array:
  """``DupUp3D``: repeat channels, unfold them into (t, h, w) blocks; the first chunk drops ``factor_t - 1`` frames."""
  repeats = out_dim * factor_t * factor_s * factor_s // x.shape[-1]
  x = jnp.repeat(x, repeats, axis=-1)
  x = einops.rearrange(x, "b t h w (o a p q) -> b (t a) (h p) (w q) o", a=factor_t, p=factor_s, q=factor_s)
  return x[:, factor_t - 1 :] if first_chunk else x


class MidBlock(nn.Module):
  """``WanMidBlock``: residual, attention, residual."""

  dim: int
  num: Numerics = Numerics()

  @nn.compact
  def __call__(self, x: Array, cache: Cache = None) -> tuple[Array, Cache]:
    x, c0 = ResidualBlock(self.dim, self.dim, self.num, name="resnets_0")(x, _sub(cache, "resnets_0"))
    x = AttentionBlock(self.num, name="attentions_0")(x)
    x, c1 = ResidualBlock(self.dim, self.dim, self.num, name="resnets_1")(x, _sub(cache, "resnets_1"))
    return x, {"resnets_0": c0, "resnets_1": c1}


class ResidualDownBlock(nn.Module):
  """Wan2.2's ``WanResidualDownBlock``: residual blocks, an optional downsampler, plus the ``AvgDown3D`` shortcut."""

  in_dim: int
  out_dim: int
  num_res_blocks: int
  temporal: bool
  down: bool
  num: Numerics = Numerics()

  @nn.compact
  def __call__(self, x: Array, cache: Cache = None) -> tuple[Array, Cache]:
    shortcut = avg_down(x, self.out_dim, 2 if self.temporal else 1, 2 if self.down else 1)
    new, d = {}, self.in_dim
    for j in range(self.num_res_blocks):
      x, new[f"resnets_{j}"] = ResidualBlock(d, self.out_dim, self.num, name=f"resnets_{j}")(
          x, _sub(cache, f"resnets_{j}")
      )
      d = self.out_dim
    if self.down:
      mode = "downsample3d" if self.temporal else "downsample2d"
      x, c = Resample(self.out_dim, mode, num=self.num, name="downsampler")(x, _sub(cache, "downsampler"))
      if c is not None:
        new["downsampler"] = c
    return x + shortcut.astype(x.dtype), new


class UpBlock(nn.Module):
  """``WanUpBlock`` (Wan2.1) or ``WanResidualUpBlock`` (Wan2.2, ``residual``): residual blocks and an upsampler."""

  in_dim: int
  out_dim: int
  num_res_blocks: int
  mode: str | None  # upsample2d | upsample3d | None
  residual: bool
  num: Numerics = Numerics()

  @nn.compact
  def __call__(self, x: Array, cache: Cache = None) -> tuple[Array, Cache]:
    x_in = x
    new, d = {}, self.in_dim
    for j in range(self.num_res_blocks + 1):
      x, new[f"resnets_{j}"] = ResidualBlock(d, self.out_dim, self.num, name=f"resnets_{j}")(
          x, _sub(cache, f"resnets_{j}")
      )
      d = self.out_dim
    if self.mode is not None:
      name = "upsampler" if self.residual else "upsamplers_0"
      out_dim = self.out_dim if self.residual else None
      x, c = Resample(self.out_dim, self.mode, out_dim, self.num, name=name)(x, _sub(cache, name))
      if c is not None:
        new[name] = c
      if self.residual:
        factor_t = 2 if self.mode == "upsample3d" else 1
        x = x + dup_up(x_in, self.out_dim, factor_t, 2, first_chunk=cache is None).astype(x.dtype)
    return x, new


class _Coder(nn.Module):
  """What the encoder and the decoder share: their sizes, numerics and causal input convolution."""

  config: WanVAEConfig
  num: Numerics = Numerics()

  def _conv_in(self, x: Array, cache: Cache, features: int) -> tuple[Array, dict]:
    """``conv_in`` on one chunk; returns (features, the new cache holding conv_in's)."""
    new = {}
    x, new["conv_in"] = _causal(_conv3(features, "conv_in", self.num), x, _sub(cache, "conv_in"))
    return x, new


class Encoder3d(_Coder):
  """``WanEncoder3d`` applied to one chunk; returns (features [B, t', h, w, 2 z], new cache)."""

  @nn.compact
  def __call__(self, x: Array, cache: Cache = None) -> tuple[Array, Cache]:
    cfg, num = self.config, self.num
    mult = tuple(cfg.dim_mult)
    dims = [cfg.base_dim * m for m in (1,) + mult]
    x, new = self._conv_in(x, cache, dims[0])
    j = 0
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
      last = i == len(mult) - 1
      if cfg.is_residual:
        name = f"down_blocks_{i}"
        x, new[name] = ResidualDownBlock(
            in_dim,
            out_dim,
            cfg.num_res_blocks,
            bool(cfg.temperal_downsample[i]) if not last else False,
            not last,
            num,
            name=name,
        )(x, _sub(cache, name))
        continue
      for _ in range(cfg.num_res_blocks):
        name = f"down_blocks_{j}"
        x, new[name] = ResidualBlock(in_dim, out_dim, num, name=name)(x, _sub(cache, name))
        j += 1
        in_dim = out_dim
      if not last:
        name = f"down_blocks_{j}"
        mode = "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"
        x, c = Resample(out_dim, mode, num=num, name=name)(x, _sub(cache, name))
        if c is not None:
          new[name] = c
        j += 1
    x, new["mid_block"] = MidBlock(dims[-1], num, name="mid_block")(x, _sub(cache, "mid_block"))
    x = nn.silu(ChannelL2Norm(num, name="norm_out")(x))
    x, new["conv_out"] = _causal(_conv3(2 * cfg.z_dim, "conv_out", num), x, _sub(cache, "conv_out"))
    return x, new


class Decoder3d(_Coder):
  """``WanDecoder3d`` applied to one chunk (one latent frame); returns (pixels-or-patches, new cache)."""

  @nn.compact
  def __call__(self, x: Array, cache: Cache = None) -> tuple[Array, Cache]:
    cfg, num = self.config, self.num
    mult = tuple(cfg.dim_mult)
    dims = [cfg.decoder_base_dim * m for m in (mult[-1],) + mult[::-1]]
    up_t = tuple(cfg.temperal_downsample)[::-1]
    x, new = self._conv_in(x, cache, dims[0])
    x, new["mid_block"] = MidBlock(dims[0], num, name="mid_block")(x, _sub(cache, "mid_block"))
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
      if i > 0 and not cfg.is_residual:
        in_dim //= 2  # Wan2.1's upsamplers halve the width
      up = i != len(mult) - 1
      mode = ("upsample3d" if up_t[i] else "upsample2d") if up else None
      name = f"up_blocks_{i}"
      x, new[name] = UpBlock(in_dim, out_dim, cfg.num_res_blocks, mode, cfg.is_residual, num, name=name)(
          x, _sub(cache, name)
      )
    x = nn.silu(ChannelL2Norm(num, name="norm_out")(x))
    x, new["conv_out"] = _causal(_conv3(cfg.out_channels, "conv_out", num), x, _sub(cache, "conv_out"))
    return x, new


def patchify(x: Array, p: int) -> Array:
  """[B, T, H, W, C] -> [B, T, H/p, W/p, C*p*p]; channel order (c, pw, ph) as the reference's ``patchify``."""
  if p == 1:
    return x
  return einops.rearrange(x, "b t (h ph) (w pw) c -> b t h w (c pw ph)", ph=p, pw=p)


def unpatchify(x: Array, p: int) -> Array:
  """Inverse of :func:`patchify`."""
  if p == 1:
    return x
  return einops.rearrange(x, "b t h w (c pw ph) -> b t (h ph) (w pw) c", ph=p, pw=p)


class WanVAE(nn.Module):
  """``AutoencoderKLWan``: parameters ``encoder``, ``quant_conv``, ``post_quant_conv``, ``decoder``.

  The methods process one temporal chunk; :func:`encode` / :func:`decode` run the whole causal schedule.
  """

  config: WanVAEConfig
  num: Numerics = Numerics()

  def setup(self):
    z = self.config.z_dim
    self.encoder = Encoder3d(self.config, self.num)
    self.quant_conv = _conv(2 * z, (1, 1, 1), "quant_conv", self.num)
    self.post_quant_conv = _conv(z, (1, 1, 1), "post_quant_conv", self.num)
    self.decoder = Decoder3d(self.config, self.num)

  def encode_chunk(self, video: Array, cache: Cache = None) -> tuple[Array, Cache]:
    """Pixel frames [B, t, H, W, C] (t = 1 with ``cache=None``, else 4) -> (posterior mean [B, t/4 or 1, h, w, z],
    cache for the next chunk)."""
    x = patchify(video.astype(self.num.dtype), self.config.patch_size)
    h, cache = self.encoder(x, cache)
    return self.quant_conv(h)[..., : self.config.z_dim], cache  # DiagonalGaussianDistribution.mode()

  def decode_chunk(self, z: Array, cache: Cache = None) -> tuple[Array, Cache]:
    """One latent frame [B, 1, h, w, z] -> (pixel frames [B, 1 or 4, H, W, C], cache for the next chunk)."""
    x, cache = self.decoder(self.post_quant_conv(z.astype(self.num.dtype)), cache)
    x = unpatchify(x, self.config.patch_size)
    return (jnp.clip(x, -1.0, 1.0) if self.config.clip_output else x), cache

  def __call__(self, video: Array) -> Array:
    """Two-chunk round trip of a [B, 5, H, W, C] video, used to initialise every parameter (the temporal convs of
    the resamplers only run from the second chunk on)."""
    z0, cache = self.encode_chunk(video[:, :1])
    z1, _ = self.encode_chunk(video[:, 1:], cache)
    x0, cache = self.decode_chunk(z0)
    x1, _ = self.decode_chunk(z1, cache)
    return jnp.concatenate([x0, x1], axis=1)


# ----------------------------------------------------------------------------- pure functions


def _init_dummy(vae: WanVAE) -> jax.ShapeDtypeStruct:
  s = vae.config.stride_hw
  return jax.ShapeDtypeStruct((1, 1 + CHUNK_FRAMES, s, s, vae.config.video_channels), vae.num.dtype)


def abstract_params(vae: WanVAE) -> Any:
  """Boxed (logically partitioned) ``jax.ShapeDtypeStruct`` tree of the parameters; no allocation.

  The converter checks every mapped key and shape against it. Shapes do not depend on the video size.
  """
  return jax.eval_shape(lambda r, x: vae.init(r, x)["params"], jax.random.key(0), _init_dummy(vae))


def abstract_params_from_diffusers(cfg: Mapping[str, Any]) -> Any:
  """Unboxed abstract parameter tree of the VAE that a diffusers ``vae/config.json`` describes (the converter's
  validation target)."""
  return sharding.strip_boxes(abstract_params(WanVAE(config_from_diffusers(cfg))))


def init(vae: WanVAE, rng: Array) -> Any:
  """Random boxed parameters with the layers' initialisers: conv kernels U(+-1/sqrt(fan_in)) as PyTorch's default,
  biases 0, norm scales 1. Host-side (call it outside ``jit``; :func:`abstract_params` gives the tree abstractly).

  Same distribution as ``vae.init``, without compiling the forward pass: the tree comes from
  :func:`abstract_params` and the values from a numpy generator seeded by ``rng`` (deterministic per key). The
  published weights replace them (:func:`torch_key_to_target`).
  """
  gen = np.random.default_rng(np.asarray(jax.random.key_data(rng)).ravel().tolist())

  def draw(path, a):
    name = jax.tree_util.keystr(path)
    if "kernel" in name:
      bound = 1.0 / math.sqrt(math.prod(a.shape[:-1]))
      return jnp.asarray(gen.uniform(-bound, bound, a.shape).astype(a.dtype))
    return jnp.asarray((np.ones if "scale" in name else np.zeros)(a.shape, a.dtype))

  return jax.tree_util.tree_map_with_path(draw, abstract_params(vae))


def _check_video(cfg: WanVAEConfig, video: Array, where: str) -> int:
  if video.ndim != 5 or video.shape[-1] != cfg.video_channels:
    raise ValueError(f"{where}: video must be [B, T, H, W, {cfg.video_channels}], got shape {tuple(video.shape)}")
  t, h, w = video.shape[1:4]
  if (t - 1) % CHUNK_FRAMES or h % cfg.stride_hw or w % cfg.stride_hw:
    raise ValueError(
        f"{where}: video (T, H, W) = {(t, h, w)} needs T = 1 + {CHUNK_FRAMES}k frames and H, W "
        f"divisible by the spatial stride {cfg.stride_hw}"
    )
  return (t - 1) // CHUNK_FRAMES


def _chunked(step, first: Array, rest: Array, n: int, per_chunk: int) -> Array:
  """Runs ``step(x, cache) -> (y, cache)`` on ``first`` then, in one ``lax.scan``, on ``n`` chunks of ``rest``."""
  y0, cache = step(first, None)
  if n == 0:
    return y0
  chunks = einops.rearrange(rest, "b (n t) h w c -> n b t h w c", n=n, t=per_chunk)
  _, ys = jax.lax.scan(lambda c, x: step(x, c)[::-1], cache, chunks)
  return jnp.concatenate([y0, einops.rearrange(ys, "n b t h w c -> b (n t) h w c")], axis=1)


def encode(vae: WanVAE, params: Any, video: Array) -> Array:
  """Video [B, 1 + 4k, H, W, C] in [-1, 1] -> posterior mean [B, 1 + k, H/s, W/s, z] (un-normalised)."""
  n = _check_video(vae.config, video, "wan.vae.encode")
  step = lambda x, c: vae.apply({"params": params}, x, c, method=WanVAE.encode_chunk)  # noqa: E731
  return _chunked(step, video[:, :1], video[:, 1:], n, CHUNK_FRAMES)


def decode(vae: WanVAE, params: Any, z: Array) -> Array:
  """Un-normalised latents [B, F, h, w, z] -> video [B, 1 + 4 (F - 1), h*s, w*s, C], clamped to [-1, 1]."""
  cfg = vae.config
  if z.ndim != 5 or z.shape[-1] != cfg.z_dim or z.shape[1] < 1:
    raise ValueError(f"wan.vae.decode: latents must be [B, F >= 1, h, w, {cfg.z_dim}], got shape {tuple(z.shape)}")
  step = lambda x, c: vae.apply({"params": params}, x, c, method=WanVAE.decode_chunk)  # noqa: E731
  return _chunked(step, z[:, :1], z[:, 1:], z.shape[1] - 1, 1)


def normalize(cfg: WanVAEConfig, mean: Array) -> Array:
  """Raw posterior mean -> the DiT's latents, ``(mean - latents_mean) / latents_std`` (Wan pipelines), float32."""
  m = jnp.asarray(cfg.latents_mean, jnp.float32)
  s = jnp.asarray(cfg.latents_std, jnp.float32)
  return (jnp.asarray(mean, jnp.float32) - m) / s


def denormalize(cfg: WanVAEConfig, latents: Array) -> Array:
  """Inverse of :func:`normalize`: ``latents * latents_std + latents_mean``, float32."""
  m = jnp.asarray(cfg.latents_mean, jnp.float32)
  s = jnp.asarray(cfg.latents_std, jnp.float32)
  return jnp.asarray(latents, jnp.float32) * s + m


# ----------------------------------------------------------------------------- published weights

_RES = r"(?:norm[12]\.gamma|(?:conv[12]|conv_shortcut)\.(?:weight|bias))"
_ATT = r"(?:norm\.gamma|(?:to_qkv|proj)\.(?:weight|bias))"
_RSM = r"(?:(?:resample\.1|time_conv)\.(?:weight|bias))"
_MID = rf"mid_block\.(?:resnets\.\d+\.{_RES}|attentions\.\d+\.{_ATT})"
_ENDS = r"(?:conv_in|conv_out)\.(?:weight|bias)|norm_out\.gamma"
_ENC = rf"encoder\.(?:{_ENDS}|{_MID}|down_blocks\.\d+\.(?:{_RES}|{_RSM}|resnets\.\d+\.{_RES}|" rf"downsampler\.{_RSM}))"
_DEC = rf"decoder\.(?:{_ENDS}|{_MID}|up_blocks\.\d+\.(?:resnets\.\d+\.{_RES}|upsamplers\.0\.{_RSM}|upsampler\.{_RSM}))"
_KEY = re.compile(rf"{_ENC}|{_DEC}|(?:quant_conv|post_quant_conv)\.(?:weight|bias)")


def rms_gamma(x: np.ndarray) -> np.ndarray:
  """``WanRMS_norm.gamma`` ``[C, 1, 1, 1]`` (or ``[C, 1, 1]`` in attention) -> Flax ``scale`` ``[C]``."""
  if x.ndim not in (1, 3, 4) or any(s != 1 for s in x.shape[1:]):
    raise ValueError(f"RMS-norm gamma: expected shape [C, 1, 1(, 1)], got {x.shape}")
  return np.ascontiguousarray(x.reshape(x.shape[0]))


def torch_key_to_target(name: str) -> weights.Target:
  """Maps one tensor name of a diffusers ``AutoencoderKLWan`` state dict to its Flax parameter.

  Conv weights (3D ``[out, in, t, h, w]``, 2D ``[out, in, h, w]``, incl. the 1x1 attention projections) go through
  :func:`weights.conv`; RMS-norm ``gamma`` through :func:`rms_gamma`; biases unchanged. The model has no buffers.

  Raises:
    ValueError: for any name that is not a parameter of ``AutoencoderKLWan`` (the message names the key).
  """
  if not _KEY.fullmatch(name):
    raise ValueError(f"wan.vae.torch_key_to_target: unknown AutoencoderKLWan key {name!r}")
  parts = name.split(".")
  path: list[str] = []
  for p in parts[:-1]:
    if p.isdigit():
      path[-1] = f"{path[-1]}_{p}"
    else:
      path.append(p)
  leaf = parts[-1]
  if leaf == "weight":
    return weights.Target(tuple(path) + ("kernel",), weights.conv)
  if leaf == "gamma":
    return weights.Target(tuple(path) + ("scale",), rms_gamma)
  return weights.Target(tuple(path) + ("bias",), weights.identity)
