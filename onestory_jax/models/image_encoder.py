"""Image encoder interface for the I2V image-token path.

Wan2.1-I2V feeds the start image to the DiT twice: through the channel path (VAE latent of
the first frame + mask, see ``codec.py``) and as image tokens through a decoupled image
cross-attention. In the real model those tokens are CLIP ViT-H/14 penultimate-layer
features, 257 tokens x 1280 channels. OneStory (arXiv 2512.07802, Sec. 4.1) uses this path
for I2MSV's first shot; for later shots the design notes feed it the top-ranked memory frame.

Everything else in the code talks to an :class:`ImageEncoder`; :func:`make_image_encoder`
picks the backend from ``config.image_encoder.name``:

* ``patches`` (demo): :class:`PatchImageEncoder`, lossless, parameter-free pixel patches.
* ``clip_vision`` (Wan2.1-I2V configs): :class:`CLIPImageEncoder`, the CLIP ViT-H/14 tower of
  :mod:`onestory_jax.models.wan.clip` with CLIPImageProcessor's preprocessing; its tokens are
  the penultimate layer's hidden states, as in diffusers' ``WanImageToVideoPipeline.encode_image``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import einops
import jax
import jax.numpy as jnp

from onestory_jax.models.wan import clip as clip_vision

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
      raise ValueError(
          f"PatchImageEncoder: image (H, W) = {(height, width)} must be positive and "
          f"divisible by the patch size {p}"
      )

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
      raise ValueError(f"PatchImageEncoder.encode: images must be [B, H, W, 3], got shape " f"{tuple(images.shape)}")
    self._check(images.shape[1], images.shape[2])
    p = self.patch
    return einops.rearrange(jnp.asarray(images), "b (h ph) (w pw) c -> b (h w) (ph pw c)", ph=p, pw=p)

  def decode(self, tokens: Array, height: int, width: int) -> jax.Array:
    """Inverse of :meth:`encode` (for tests and visualisation)."""
    self._check(height, width)
    p = self.patch
    return einops.rearrange(
        jnp.asarray(tokens), "b (h w) (ph pw c) -> b (h ph) (w pw) c", h=height // p, w=width // p, ph=p, pw=p, c=3
    )


@dataclasses.dataclass(frozen=True)
class CLIPImageEncoder:
  """CLIP vision tokens: [B, H, W, 3] in [-1, 1] -> hidden_states[layer], [B, 257, 1280] for ViT-H/14.

  Images of any size are preprocessed in-graph as CLIPImageProcessor does
  (:func:`clip_vision.preprocess`: shortest edge to ``image_size``, centre crop, CLIP mean/std),
  so the token count and width do not depend on the input size. Defaults are ViT-H/14's.
  ``init`` returns logically partitioned (boxed) random parameters; real ones come from the
  converter (:func:`clip_vision.torch_key_to_target`).
  """

  hidden_size: int = 1280
  intermediate_size: int = 5120
  num_layers: int = 32
  num_heads: int = 16
  patch_size: int = 14
  image_size: int = 224
  layer: int = -2
  eps: float = 1e-5
  act: str = "gelu"
  shortest_edge: int | None = None  # None: image_size
  mean: tuple[float, float, float] = clip_vision.CLIP_MEAN
  std: tuple[float, float, float] = clip_vision.CLIP_STD
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    n = self.num_layers
    if isinstance(self.layer, bool) or not isinstance(self.layer, int) or not -(n + 1) <= self.layer <= n:
      raise ValueError(f"CLIPImageEncoder: layer must be an int in [{-(n + 1)}, {n}], got {self.layer!r}")

  @property
  def module(self) -> clip_vision.CLIPVisionTransformer:
    return clip_vision.CLIPVisionTransformer(
        hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size,
        num_layers=self.num_layers,
        num_heads=self.num_heads,
        patch_size=self.patch_size,
        image_size=self.image_size,
        eps=self.eps,
        act=self.act,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
    )

  def num_tokens(self, height: int, width: int) -> int:
    del height, width  # every image is resized and cropped to image_size first
    return 1 + (self.image_size // self.patch_size) ** 2

  def token_dim(self, height: int, width: int) -> int:
    del height, width
    return self.hidden_size

  def init(self, rng: jax.Array) -> Any:
    pixels = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
    return self.module.init(rng, pixels)["params"]

  def preprocess(self, images: Array) -> jax.Array:
    """[B, H, W, 3] in [-1, 1] -> normalised [B, image_size, image_size, 3]."""
    return clip_vision.preprocess(
        jnp.asarray(images), crop_size=self.image_size, shortest_edge=self.shortest_edge, mean=self.mean, std=self.std
    )

  def encode(self, params: Any, images: Array) -> jax.Array:
    return self.module.apply({"params": params}, self.preprocess(images), layer=self.layer)


_IMAGE_ENCODERS = ("patches", "clip_vision")
_CLIP_FIELDS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "patch_size", "image_size")


def make_image_encoder(config) -> ImageEncoder:
  """Image encoder named by ``config.image_encoder.name``.

  ``'patches'`` (demo): field ``patch``.

  ``'clip_vision'`` (Wan2.1-I2V): fields of ``config.image_encoder`` (ViT-H/14's values in
  brackets; :func:`clip_vision.config_from_transformers` reads them from the release's
  ``image_encoder/config.json``, :func:`clip_vision.processor_config_from_transformers` the
  preprocessing from ``image_processor/preprocessor_config.json``): ``hidden_size`` (1280),
  ``intermediate_size`` (5120), ``num_layers`` (32), ``num_heads`` (16), ``patch_size`` (14),
  ``image_size`` (224, the crop), ``layer`` (-2: the penultimate hidden states, as Wan uses),
  optional ``eps`` (1e-5), ``act`` ('gelu'), ``shortest_edge`` (the image size), ``mean`` /
  ``std`` (CLIP's), ``dtype`` / ``param_dtype`` (float32).
  """
  name = config.image_encoder.name
  if name == "patches":
    return PatchImageEncoder(patch=int(config.image_encoder.patch))
  if name == "clip_vision":
    ie = config.image_encoder
    sizes = {}
    for field in _CLIP_FIELDS:
      if field not in ie:
        raise ValueError(f"config.image_encoder.{field} is required for the 'clip_vision' image encoder")
      sizes[field] = int(ie[field])
    shortest = ie.get("shortest_edge", None)
    return CLIPImageEncoder(
        **sizes,
        layer=int(ie.get("layer", -2)),
        eps=float(ie.get("eps", 1e-5)),
        act=str(ie.get("act", "gelu")),
        shortest_edge=None if shortest is None else int(shortest),
        mean=tuple(float(v) for v in ie.get("mean", clip_vision.CLIP_MEAN)),
        std=tuple(float(v) for v in ie.get("std", clip_vision.CLIP_STD)),
        dtype=jnp.dtype(ie.get("dtype", "float32")),
        param_dtype=jnp.dtype(ie.get("param_dtype", "float32")),
    )
  raise ValueError(
      f"config.image_encoder.name: unknown image encoder {name!r}; available: " f"{', '.join(_IMAGE_ENCODERS)}"
  )


def num_image_tokens(config, height: int, width: int) -> int:
  """Image tokens per image of (height, width) pixels (257 for CLIP ViT-H/14)."""
  return make_image_encoder(config).num_tokens(height, width)


def image_dim(config, height: int, width: int) -> int:
  """Width of an image token (p*p*3 for patches, 1280 for CLIP ViT-H/14)."""
  return make_image_encoder(config).token_dim(height, width)
