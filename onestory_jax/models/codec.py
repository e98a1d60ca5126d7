"""Video codec interface: pixels <-> latents, and the I2V first-frame mask.

OneStory (arXiv 2512.07802, Sec. 3, Eq. 1-2) runs its DiT on video latents: every shot is
encoded by the backbone's VAE (Wan2.1: stride (4, 8, 8), 16 channels) and the memory bank
keeps those latents. The model code only ever talks to a :class:`Codec`, so the CPU demo and
the 14B configuration differ only in the object that :func:`make_codec` returns:

* ``space_to_depth`` (demo): :class:`SpaceToDepthCodec`, a lossless, parameter-free
  rearrangement of (t, h, w) blocks into channels. Decoding is the exact inverse.
* ``wan_vae`` (real configs): the Wan2.1 causal VAE, ported later behind the same interface.

I2V mask layout (Wan2.1-I2V's 4 mask channels). Wan builds a per-pixel-frame mask
(1 = frame given, 0 = to generate), groups it into latent frames of ``stride_t`` pixel
frames, and puts the frames of a group on the channel axis. Because Wan's VAE is causal, its
first latent frame covers a single pixel frame, so Wan repeats the first mask entry
``stride_t`` times before grouping (T = 1 + 4k pixel frames -> 1 + k latent frames). The
space-to-depth codec is not causal: T is a multiple of ``stride_t``, every latent frame covers
exactly ``stride_t`` pixel frames, and no repeat is needed. The channel layout is otherwise
identical: channel ``c`` of latent frame ``f`` is the mask of pixel frame ``f * stride_t + c``.

Pixel convention: videos are float arrays in [-1, 1] with shape [B, T, H, W, 3]
(:func:`to_unit` / :func:`to_uint8` convert from / to uint8).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Sequence

import einops
import jax
import jax.numpy as jnp
import numpy as np

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

  def frame_mask(self, pixel_mask: Array,
                 latent_hw: tuple[int, int] | None = None) -> jax.Array:
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
          f"divisible by the stride (t, h, w) = {self.stride}")
    return frames // st, height // sh, width // sw, self.latent_channels

  def video_shape(self, latent_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """(T, H, W) for latents of (latent_frames, height, width) cells."""
    if min(latent_frames, height, width) < 1:
      raise ValueError(f"SpaceToDepthCodec: latent (F, h, w) = {(latent_frames, height, width)} "
                       "must be positive")
    st, sh, sw = self.stride
    return latent_frames * st, height * sh, width * sw

  def init(self, rng: jax.Array) -> dict:
    del rng
    return {}

  def encode(self, params: Any, video: Array) -> jax.Array:
    """[B, T, H, W, 3] in [-1, 1] -> [B, T/st, H/sh, W/sw, 3*st*sh*sw] (dtype kept)."""
    del params
    if video.ndim != 5 or video.shape[-1] != 3:
      raise ValueError(f"SpaceToDepthCodec.encode: video must be [B, T, H, W, 3], got shape "
                       f"{tuple(video.shape)}")
    self.latent_shape(*video.shape[1:4])
    st, sh, sw = self.stride
    return einops.rearrange(
        jnp.asarray(video), "b (f pt) (h ph) (w pw) c -> b f h w (pt ph pw c)",
        pt=st, ph=sh, pw=sw)

  def decode(self, params: Any, latents: Array) -> jax.Array:
    """[B, F, h, w, 3*st*sh*sw] -> [B, F*st, h*sh, w*sw, 3] (exact inverse of encode)."""
    del params
    if latents.ndim != 5 or latents.shape[-1] != self.latent_channels:
      raise ValueError(f"SpaceToDepthCodec.decode: latents must be [B, F, h, w, "
                       f"{self.latent_channels}] for stride {self.stride}, got shape "
                       f"{tuple(latents.shape)}")
    st, sh, sw = self.stride
    return einops.rearrange(
        jnp.asarray(latents), "b f h w (pt ph pw c) -> b (f pt) (h ph) (w pw) c",
        pt=st, ph=sh, pw=sw, c=3)

  def frame_mask(self, pixel_mask: Array,
                 latent_hw: tuple[int, int] | None = None) -> jax.Array:
    """I2V mask in latent space (see the module docstring for the layout).

    Args:
      pixel_mask: [B, T], 1 where the pixel frame is given (e.g. the start image at t = 0).
      latent_hw: (h, w) latent cells to broadcast to; None gives size-1 spatial axes
        (broadcastable against the latents).

    Returns:
      float32 [B, T/st, h, w, st]; channel c of latent frame f is pixel frame f*st + c.
    """
    if pixel_mask.ndim != 2:
      raise ValueError(f"SpaceToDepthCodec.frame_mask: pixel_mask must be [B, T], got shape "
                       f"{tuple(pixel_mask.shape)}")
    st = self.stride[0]
    if pixel_mask.shape[1] % st or pixel_mask.shape[1] < 1:
      raise ValueError(f"SpaceToDepthCodec.frame_mask: pixel_mask frames T = {pixel_mask.shape[1]} "
                       f"must be positive and divisible by the stride t = {st}")
    b, t = pixel_mask.shape
    mask = jnp.asarray(pixel_mask, jnp.float32).reshape(b, t // st, 1, 1, st)
    if latent_hw is None:
      return mask
    h, w = latent_hw
    return jnp.broadcast_to(mask, (b, t // st, h, w, st))


_CODECS = ("space_to_depth",)


def make_codec(config) -> Codec:
  """Codec named by ``config.codec.name`` (e.g. 'space_to_depth')."""
  name = config.codec.name
  if name == "space_to_depth":
    return SpaceToDepthCodec(stride=tuple(config.codec.stride))
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
