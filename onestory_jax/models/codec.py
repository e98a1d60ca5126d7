"""Video codec interface: pixels <-> latents, and the I2V first-frame mask.

OneStory (arXiv 2512.07802, Sec. 3, Eq. 1-2) runs its DiT on video latents: every shot is
encoded by the backbone's VAE (Wan2.1: stride (4, 8, 8), 16 channels) and the memory bank
keeps those latents. The model code only ever talks to a :class:`Codec`, so the CPU demo and
the 14B configuration differ only in the object that :func:`make_codec` returns:

* ``space_to_depth`` (demo): :class:`SpaceToDepthCodec`, a lossless, parameter-free
  rearrangement of (t, h, w) blocks into channels. Decoding is the exact inverse.
* ``wan_vae`` (real configs): :class:`WanVAECodec`, the causal Wan VAE (Wan2.1: stride (4, 8, 8), 16 channels;
  Wan2.2: stride (4, 16, 16), 48 channels) of :mod:`onestory_jax.models.wan.vae`. Its latents are the normalised
  ones the Wan DiT works on, ``(mean - latents_mean) / latents_std``; T = 1 + 4k pixel frames give 1 + k latent
  frames (the first latent frame covers frame 0 alone).

I2V mask layout (Wan2.1-I2V's 4 mask channels). Wan builds a per-pixel-frame mask
(1 = frame given, 0 = to generate), groups it into latent frames of ``stride_t`` pixel
frames, and puts the frames of a group on the channel axis. Because Wan's VAE is causal, its
first latent frame covers a single pixel frame, so Wan repeats the first mask entry
``stride_t`` times before grouping (T = 1 + 4k pixel frames -> 1 + k latent frames). The
space-to-depth codec is not causal: T is a multiple of ``stride_t``, every latent frame covers
exactly ``stride_t`` pixel frames, and no repeat is needed. The channel layout is otherwise
identical: channel ``c`` of latent frame ``f`` is the mask of pixel frame ``f * stride_t + c`` (for the Wan VAE,
of the sequence with frame 0 repeated, i.e. pixel frame ``max(0, f * stride_t + c - stride_t + 1)``).

Pixel convention: videos are float arrays in [-1, 1] with shape [B, T, H, W, 3]
(:func:`to_unit` / :func:`to_uint8` convert from / to uint8).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Protocol, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from onestory_jax.models.wan import vae as wan_vae

Array = Any  # jax.Array or np.ndarray


class Codec(Protocol):
  """What the model and the sampler need from a video codec.

  Attributes:
    stride: (t, h, w) compression factors.
    latent_channels: channels C of a latent.
    mask_channels: channels of the I2V first-frame mask in latent space (stride t for Wan).
  """

  stride: tuple[int, int, int]

  @property
  def latent_channels(self) -> int:
    ...

  @property
  def mask_channels(self) -> int:
    ...

  def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(F, h, w, C) of the latents of a [T=frames, H=height, W=width] video."""

  def video_shape(self, latent_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """(T, H, W) of the video decoded from [F, h, w, C] latents."""

  def init(self, rng: jax.Array) -> Any:
    """Parameters of the codec (an empty dict for parameter-free codecs)."""

  def encode(self, params: Any, video: Array) -> jax.Array:
    """[B, T, H, W, 3] in [-1, 1] -> [B, F, h, w, C]."""

  def decode(self, params: Any, latents: Array) -> jax.Array:
    """[B, F, h, w, C] -> [B, T, H, W, 3]."""

  def frame_mask(self, pixel_mask: Array, latent_hw: tuple[int, int] | None = None) -> jax.Array:
    """[B, T] (1 = given frame) -> [B, F, h, w, mask_channels]."""


def _check_stride(stride: Sequence[int], where: str) -> tuple[int, int, int]:
  stride = tuple(stride)
  if len(stride) != 3 or not all(isinstance(s, (int, np.integer)) and s >= 1 for s in stride):
    raise ValueError(f"{where}: stride must be three positive ints (t, h, w), got {stride!r}")
  return tuple(int(s) for s in stride)  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class SpaceToDepthCodec:
  """Lossless, parameter-free codec: (t, h, w) blocks of pixels become channels.

  video [B, T, H, W, 3] -> latents [B, T/st, H/sh, W/sw, 3*st*sh*sw]; channel order
  (st, sh, sw, rgb). ``decode`` is the exact inverse of ``encode``.
  """

  stride: tuple[int, int, int] = (2, 4, 4)

  def __post_init__(self):
    object.__setattr__(self, "stride", _check_stride(self.stride, "SpaceToDepthCodec"))

  @property
  def latent_channels(self) -> int:
    st, sh, sw = self.stride
    return 3 * st * sh * sw

  @property
  def mask_channels(self) -> int:
    return self.stride[0]

  def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(F, h, w, C) for a video of (frames, height, width); raises on indivisible sizes."""
    st, sh, sw = self.stride
    if frames % st or height % sh or width % sw or min(frames, height, width) < 1:
      raise ValueError(
          f"SpaceToDepthCodec: video (T, H, W) = {(frames, height, width)} must be positive and "
          f"divisible by the stride (t, h, w) = {self.stride}"
      )
    return frames // st, height // sh, width // sw, self.latent_channels

  def video_shape(self, latent_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """(T, H, W) for latents of (latent_frames, height, width) cells."""
    if min(latent_frames, height, width) < 1:
      raise ValueError(f"SpaceToDepthCodec: latent (F, h, w) = {(latent_frames, height, width)} " "must be positive")
    st, sh, sw = self.stride
    return latent_frames * st, height * sh, width * sw

  def init(self, rng: jax.Array) -> dict:
    del rng
    return {}

  def encode(self, params: Any, video: Array) -> jax.Array:
    """[B, T, H, W, 3] in [-1, 1] -> [B, T/st, H/sh, W/sw, 3*st*sh*sw] (dtype kept)."""
    del params
    if video.ndim != 5 or video.shape[-1] != 3:
      raise ValueError(f"SpaceToDepthCodec.encode: video must be [B, T, H, W, 3], got shape " f"{tuple(video.shape)}")
    self.latent_shape(*video.shape[1:4])
    st, sh, sw = self.stride
    return einops.rearrange(jnp.asarray(video), "b (f pt) (h ph) (w pw) c -> b f h w (pt ph pw c)", pt=st, ph=sh, pw=sw)

  def decode(self, params: Any, latents: Array) -> jax.Array:
    """[B, F, h, w, 3*st*sh*sw] -> [B, F*st, h*sh, w*sw, 3] (exact inverse of encode)."""
    del params
    if latents.ndim != 5 or latents.shape[-1] != self.latent_channels:
      raise ValueError(
          f"SpaceToDepthCodec.decode: latents must be [B, F, h, w, "
          f"{self.latent_channels}] for stride {self.stride}, got shape "
          f"{tuple(latents.shape)}"
      )
    st, sh, sw = self.stride
    return einops.rearrange(
        jnp.asarray(latents), "b f h w (pt ph pw c) -> b (f pt) (h ph) (w pw) c", pt=st, ph=sh, pw=sw, c=3
    )

  def frame_mask(self, pixel_mask: Array, latent_hw: tuple[int, int] | None = None) -> jax.Array:
    """I2V mask in latent space (see the module docstring for the layout).

    Args:
      pixel_mask: [B, T], 1 where the pixel frame is given (e.g. the start image at t = 0).
      latent_hw: (h, w) latent cells to broadcast to; None gives size-1 spatial axes
        (broadcastable against the latents).

    Returns:
      float32 [B, T/st, h, w, st]; channel c of latent frame f is pixel frame f*st + c.
    """
    if pixel_mask.ndim != 2:
      raise ValueError(
          f"SpaceToDepthCodec.frame_mask: pixel_mask must be [B, T], got shape " f"{tuple(pixel_mask.shape)}"
      )
    st = self.stride[0]
    if pixel_mask.shape[1] % st or pixel_mask.shape[1] < 1:
      raise ValueError(
          f"SpaceToDepthCodec.frame_mask: pixel_mask frames T = {pixel_mask.shape[1]} "
          f"must be positive and divisible by the stride t = {st}"
      )
    b, t = pixel_mask.shape
    mask = jnp.asarray(pixel_mask, jnp.float32).reshape(b, t // st, 1, 1, st)
    if latent_hw is None:
      return mask
    h, w = latent_hw
    return jnp.broadcast_to(mask, (b, t // st, h, w, st))


@functools.lru_cache(maxsize=None)
def _wan_fns(config: wan_vae.WanVAEConfig, dtype: str):
  """(module, jitted raw encode, jitted raw decode) for one VAE config and compute dtype (one compile per shape).

  float32 runs at HIGHEST conv / matmul precision, so that accelerators (TPU bf16 passes, GPU TF32) stay faithful to
  the float32 reference; bfloat16 uses the default precision.
  """
  precision = jax.lax.Precision.HIGHEST if dtype == "float32" else None
  vae = wan_vae.WanVAE(config, wan_vae.Numerics(dtype=jnp.dtype(dtype), precision=precision))
  return vae, jax.jit(functools.partial(wan_vae.encode, vae)), jax.jit(functools.partial(wan_vae.decode, vae))


@dataclasses.dataclass(frozen=True)
class WanVAECodec:
  """The Wan VAE behind the :class:`Codec` protocol (Wan2.1 or Wan2.2 sizes, see :mod:`wan_vae`).

  ``encode`` returns the normalised posterior mean, float32 ``[B, 1 + k, H/s, W/s, z]`` for ``T = 1 + 4k``;
  ``decode`` inverts the normalisation, decodes and clamps to [-1, 1] (float32); ``encode_raw`` / ``decode_raw``
  work on the VAE's own (un-normalised) latents. Both run the chunked causal schedule in one compiled ``lax.scan``
  per shape. Parameters are the converted published weights (:func:`wan_vae.torch_key_to_target`) or
  :meth:`init`'s random ones.

  Attributes:
    config: VAE sizes (:data:`wan_vae.PRESETS` or :func:`wan_vae.config_from_diffusers`).
    dtype: compute dtype name ('float32' or 'bfloat16'); parameters stay float32.
  """

  config: wan_vae.WanVAEConfig = wan_vae.PRESETS["wan2.1"]
  dtype: str = "float32"

  def __post_init__(self):
    if not isinstance(self.config, wan_vae.WanVAEConfig):
      raise ValueError(f"WanVAECodec.config: expected a wan_vae.WanVAEConfig, got {type(self.config).__name__}")
    if self.config.video_channels != 3:
      raise ValueError(
          f"WanVAECodec.config: the codec works on RGB videos; in_channels / patch_size**2 = "
          f"{self.config.video_channels}, expected 3"
      )
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"WanVAECodec.dtype: expected 'float32' or 'bfloat16', got {self.dtype!r}")

  @classmethod
  def from_config(cls, codec_config) -> "WanVAECodec":
    """From ``config.codec``: ``vae`` is a preset name ('wan2.1' | 'wan2.2', default 'wan2.1') or a mapping of
    diffusers ``vae/config.json`` keys; optional ``dtype``; an optional ``stride`` must match the VAE's."""
    vae = codec_config.get("vae", "wan2.1")
    if isinstance(vae, str):
      if vae not in wan_vae.PRESETS:
        raise ValueError(
            f"config.codec.vae: unknown preset {vae!r}; available: {', '.join(wan_vae.PRESETS)} "
            "(or a mapping of diffusers vae/config.json keys)"
        )
      vae_config = wan_vae.PRESETS[vae]
    else:
      vae_config = wan_vae.config_from_diffusers(vae.to_dict() if hasattr(vae, "to_dict") else dict(vae))
    codec = cls(config=vae_config, dtype=codec_config.get("dtype", "float32"))
    stride = codec_config.get("stride", None)
    if stride is not None and tuple(stride) != codec.stride:
      raise ValueError(f"config.codec.stride = {tuple(stride)} does not match the Wan VAE's stride {codec.stride}")
    return codec

  @property
  def stride(self) -> tuple[int, int, int]:
    return self.config.stride

  @property
  def latent_channels(self) -> int:
    return self.config.z_dim

  @property
  def mask_channels(self) -> int:
    return self.stride[0]

  def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(1 + k, H/s, W/s, z) for T = 1 + 4k frames; raises on other sizes."""
    st, s, _ = self.stride
    if frames < 1 or (frames - 1) % st or height % s or width % s or min(height, width) < 1:
      raise ValueError(
          f"WanVAECodec: video (T, H, W) = {(frames, height, width)} needs T = 1 + {st}k frames and "
          f"H, W positive and divisible by the spatial stride {s} (stride (t, h, w) = {self.stride})"
      )
    return 1 + (frames - 1) // st, height // s, width // s, self.latent_channels

  def video_shape(self, latent_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """(1 + 4 (F - 1), h*s, w*s) for latents of (F, h, w) cells."""
    if min(latent_frames, height, width) < 1:
      raise ValueError(f"WanVAECodec: latent (F, h, w) = {(latent_frames, height, width)} must be positive")
    st, s, _ = self.stride
    return 1 + st * (latent_frames - 1), height * s, width * s

  def init(self, rng: jax.Array) -> Any:
    """Random float32 parameters of the right tree (unboxed); real ones come from conversion."""
    vae = _wan_fns(self.config, self.dtype)[0]
    return nn.unbox(wan_vae.init(vae, rng))

  def abstract_params(self) -> Any:
    """The tree :meth:`init` fills, as boxed (logically partitioned) ``jax.ShapeDtypeStruct`` leaves.

    Nothing is allocated and nothing runs; :func:`onestory_jax.sharding.logical_to_shardings` maps it to shardings
    and :func:`onestory_jax.weights.load_converted` restores the converted ``vae`` checkpoint onto it.
    """
    return wan_vae.abstract_params(_wan_fns(self.config, self.dtype)[0])

  def encode_raw(self, params: Any, video: Array) -> jax.Array:
    """[B, 1 + 4k, H, W, 3] in [-1, 1] -> the VAE's posterior mean (un-normalised, compute dtype)."""
    if video.ndim != 5 or video.shape[-1] != 3:
      raise ValueError(f"WanVAECodec.encode: video must be [B, T, H, W, 3], got shape {tuple(video.shape)}")
    self.latent_shape(*video.shape[1:4])
    return _wan_fns(self.config, self.dtype)[1](params, jnp.asarray(video))

  def decode_raw(self, params: Any, z: Array) -> jax.Array:
    """Un-normalised latents [B, F, h, w, z] -> video [B, 1 + 4 (F - 1), h*s, w*s, 3] (compute dtype, clamped)."""
    if z.ndim != 5 or z.shape[-1] != self.latent_channels or z.shape[1] < 1:
      raise ValueError(
          f"WanVAECodec.decode: latents must be [B, F, h, w, {self.latent_channels}], got shape " f"{tuple(z.shape)}"
      )
    return _wan_fns(self.config, self.dtype)[2](params, jnp.asarray(z))

  def encode(self, params: Any, video: Array) -> jax.Array:
    """[B, 1 + 4k, H, W, 3] in [-1, 1] -> normalised latents float32 [B, 1 + k, H/s, W/s, z]."""
    return wan_vae.normalize(self.config, self.encode_raw(params, video))

  def decode(self, params: Any, latents: Array) -> jax.Array:
    """Normalised latents [B, F, h, w, z] -> video float32 [B, 1 + 4 (F - 1), h*s, w*s, 3] in [-1, 1]."""
    if latents.ndim != 5 or latents.shape[-1] != self.latent_channels:
      raise ValueError(
          f"WanVAECodec.decode: latents must be [B, F, h, w, {self.latent_channels}], got shape "
          f"{tuple(latents.shape)}"
      )
    return self.decode_raw(params, wan_vae.denormalize(self.config, latents)).astype(jnp.float32)

  def frame_mask(self, pixel_mask: Array, latent_hw: tuple[int, int] | None = None) -> jax.Array:
    """Wan2.1-I2V mask in latent space: frame 0's entry repeated ``stride_t`` times, then grouped.

    Args:
      pixel_mask: [B, T] with T = 1 + st*k, 1 where the pixel frame is given.
      latent_hw: (h, w) latent cells to broadcast to; None gives size-1 spatial axes.

    Returns:
      float32 [B, 1 + k, h, w, st]; channel c of latent frame f is pixel frame ``max(0, f*st + c - (st - 1))``'s
      mask (latent frame 0 holds frame 0's mask on every channel).
    """
    if pixel_mask.ndim != 2:
      raise ValueError(f"WanVAECodec.frame_mask: pixel_mask must be [B, T], got shape {tuple(pixel_mask.shape)}")
    st = self.stride[0]
    b, t = pixel_mask.shape
    if t < 1 or (t - 1) % st:
      raise ValueError(
          f"WanVAECodec.frame_mask: pixel_mask frames T = {t} must be 1 + {st}k (causal stride t = " f"{st})"
      )
    m = jnp.asarray(pixel_mask, jnp.float32)
    m = jnp.concatenate([jnp.repeat(m[:, :1], st, axis=1), m[:, 1:]], axis=1)
    f = m.shape[1] // st
    mask = m.reshape(b, f, 1, 1, st)
    if latent_hw is None:
      return mask
    h, w = latent_hw
    return jnp.broadcast_to(mask, (b, f, h, w, st))


_CODECS = ("space_to_depth", "wan_vae")


def make_codec(config) -> Codec:
  """Codec named by ``config.codec.name`` ('space_to_depth' or 'wan_vae', see :meth:`WanVAECodec.from_config`)."""
  name = config.codec.name
  if name == "space_to_depth":
    return SpaceToDepthCodec(stride=tuple(config.codec.stride))
  if name == "wan_vae":
    return WanVAECodec.from_config(config.codec)
  raise ValueError(f"config.codec.name: unknown codec {name!r}; available: {', '.join(_CODECS)}")


def _xp(x: Array):
  return np if isinstance(x, (np.ndarray, np.generic)) else jnp


def to_unit(x: Array) -> Array:
  """uint8 [0, 255] -> float32 [-1, 1] (numpy in, numpy out; jax in, jax out)."""
  if x.dtype != np.uint8:
    raise ValueError(f"to_unit: expected a uint8 array, got dtype {x.dtype}")
  xp = _xp(x)
  return x.astype(xp.float32) / xp.float32(127.5) - xp.float32(1.0)


def to_uint8(x: Array) -> Array:
  """float [-1, 1] -> uint8 [0, 255], rounded to nearest and clipped."""
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"to_uint8: expected a float array in [-1, 1], got dtype {x.dtype}")
  xp = _xp(x)
  y = (x.astype(xp.float32) + 1.0) * 127.5
  return xp.clip(xp.round(y), 0, 255).astype(xp.uint8)
