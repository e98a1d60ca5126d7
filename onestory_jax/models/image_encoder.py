"""Image encoder interface for the I2V image-token path.

Wan2.1-I2V feeds the start image to the DiT twice: through the channel path (VAE latent of
the first frame + mask, see ``codec.py``) and as image tokens through a decoupled image
cross-attention. In the real model those tokens are CLIP ViT-H/14 penultimate-layer
features, 257 tokens x 1280 channels. OneStory (arXiv 2512.07802, Sec. 4.1) uses this path
for I2MSV's first shot; for later shots the design notes feed it the top-ranked memory frame.

Everything else in the code talks to an :class:`ImageEncoder`; :func:`make_image_encoder`
picks the backend from ``config.image_encoder.name``:

* ``patches`` (demo): :class:`PatchImageEncoder`, lossless, parameter-free pixel patches.
* ``clip_vit_h14`` (real configs): ported later behind the same interface.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import einops
import jax
import jax.numpy as jnp

Array = Any


class ImageEncoder(Protocol):
  """What the model needs from an image encoder."""

  def num_tokens(self, height: int, width: int) -> int:
    """Number of image tokens for an image of (height, width) pixels."""

  def token_dim(self, height: int, width: int) -> int:
    """Width of each image token."""

  def init(self, rng: jax.Array) -> Any:
    """Parameters (an empty dict for parameter-free encoders)."""

  def encode(self, params: Any, images: Array) -> jax.Array:
    """[B, H, W, 3] in [-1, 1] -> [B, num_tokens, token_dim]."""


@dataclasses.dataclass(frozen=True)
class PatchImageEncoder:
  """Lossless pixel patches: [B, H, W, 3] -> [B, (H/p)*(W/p), p*p*3], row-major patches.

  Each token holds one p x p patch, channel order (row, column, rgb).
  """

  patch: int = 8

  def __post_init__(self):
    if not isinstance(self.patch, int) or self.patch < 1:
      raise ValueError(f"PatchImageEncoder: patch must be a positive int, got {self.patch!r}")

  def _check(self, height: int, width: int) -> None:
    p = self.patch
    if height < 1 or width < 1 or height % p or width % p:
      raise ValueError(f"PatchImageEncoder: image (H, W) = {(height, width)} must be positive and "
                       f"divisible by the patch size {p}")

  def num_tokens(self, height: int, width: int) -> int:
    self._check(height, width)
    return (height // self.patch) * (width // self.patch)

  def token_dim(self, height: int, width: int) -> int:
    self._check(height, width)
    return self.patch * self.patch * 3

  def init(self, rng: jax.Array) -> dict:
    del rng
    return {}

  def encode(self, params: Any, images: Array) -> jax.Array:
    del params
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"PatchImageEncoder.encode: images must be [B, H, W, 3], got shape "
                       f"{tuple(images.shape)}")
    self._check(images.shape[1], images.shape[2])
    p = self.patch
    return einops.rearrange(jnp.asarray(images), "b (h ph) (w pw) c -> b (h w) (ph pw c)",
                            ph=p, pw=p)

  def decode(self, tokens: Array, height: int, width: int) -> jax.Array:
    """Inverse of :meth:`encode` (for tests and visualisation)."""
    self._check(height, width)
    p = self.patch
    return einops.rearrange(jnp.asarray(tokens), "b (h w) (ph pw c) -> b (h ph) (w pw) c",
                            h=height // p, w=width // p, ph=p, pw=p, c=3)


_IMAGE_ENCODERS = ("patches",)


def make_image_encoder(config) -> ImageEncoder:
  """Image encoder named by ``config.image_encoder.name`` (e.g. 'patches')."""
  name = config.image_encoder.name
  if name == "patches":
    return PatchImageEncoder(patch=int(config.image_encoder.patch))
  raise ValueError(f"config.image_encoder.name: unknown image encoder {name!r}; available: "
                   f"{', '.join(_IMAGE_ENCODERS)}")


def num_image_tokens(config, height: int, width: int) -> int:
  """Image tokens per image of (height, width) pixels (257 for CLIP ViT-H/14)."""
  return make_image_encoder(config).num_tokens(height, width)


def image_dim(config, height: int, width: int) -> int:
  """Width of an image token (p*p*3 for patches, 1280 for CLIP ViT-H/14)."""
  return make_image_encoder(config).token_dim(height, width)
