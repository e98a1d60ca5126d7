"""What a multi-shot record holds for a run config, and the training sample read from it (no TFDS, no Beam).

The build (:mod:`onestory_jax.data.build`) and the reader (:mod:`onestory_jax.data.multishot.reader`) both derive the
arrays of a record from the run config through :class:`RecordLayout`, so a record always fits the config it was built
for, and the reader can tell a config that does not fit (docs/records.md has the table of features).

Image-encoder input ("images"). The train step's image path (Wan2.1-I2V's image cross-attention: the top-ranked
memory frame, or the start image of an I2MSV sample) needs pixels. The pixel path decodes the chosen latent frame
with the VAE; records store, per latent frame, its first pixel frame instead (the start image itself for latent
frame 0), already taken through the part of the image encoder's preprocessing that shrinks it: for CLIP, the uint8
quantisation and the shortest-edge resize (:func:`image_input`, bit-exact with
:meth:`onestory_jax.models.image_encoder.CLIPImageEncoder.preprocess` on the full frame, which then only crops and
normalises); for the demo's pixel patches, the frame itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from onestory_jax.models import codec as codec_lib
from onestory_jax.models import image_encoder as image_encoder_lib
from onestory_jax.models.wan import clip as clip_lib
from onestory_jax.models.wan import umt5 as te

STORED_DTYPES = ("float16", "float32")


def text_is_frozen(config) -> bool:
  """Whether the run does not train its text encoder (``'text_encoder'`` in ``config.optim.frozen``, as every Wan
  config): then records hold the caption embeddings and the train step never runs the text encoder."""
  return "text_encoder" in tuple(config.optim.frozen)


def image_input_size(config) -> tuple[int, int] | None:
  """(height, width) of the stored image-encoder input, or None when the model has no image cross-attention."""
  if not config.model.i2v:
    return None
  encoder = image_encoder_lib.make_image_encoder(config)
  h, w = int(config.data.height), int(config.data.width)
  if isinstance(encoder, image_encoder_lib.CLIPImageEncoder):
    return clip_lib.resize_output_size(h, w, encoder.shortest_edge or encoder.image_size)
  return h, w


@jax.jit
def _round_u8(x: jax.Array) -> jax.Array:
  return jnp.clip(jnp.floor(x + 0.5), 0.0, 255.0)


def image_input(config, frames: np.ndarray) -> np.ndarray:
  """uint8 [N, H, W, 3] frames -> uint8 [N, *image_input_size(config), 3] (module docstring).

  For CLIP this is :func:`onestory_jax.models.wan.clip.preprocess` up to its crop: quantise, resize the horizontal
  then the vertical side with antialiased bicubic, rounding to uint8 after each pass.
  """
  size = image_input_size(config)
  if size is None:
    raise ValueError("image_input: the config has no image cross-attention (config.model.i2v is False)")
  frames = np.asarray(frames)
  n, h, w, _ = frames.shape
  oh, ow = size
  if (oh, ow) == (h, w):
    return frames.astype(np.uint8)
  x = jnp.asarray(frames, jnp.float32)
  if ow != w:
    x = _round_u8(jax.image.resize(x, (n, h, ow, 3), "bicubic", antialias=True))
  if oh != h:
    x = _round_u8(jax.image.resize(x, (n, oh, ow, 3), "bicubic", antialias=True))
  return np.asarray(x).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class RecordLayout:
  """The arrays of one record (a story unit of ``n`` shots) for a run config.

  Attributes:
    latent_shape: (F, h, w, C) of one shot's latents.
    frames_per_shot, height, width: the pixel shot size the latents come from.
    text_len: caption tokens (padded).
    text_dim: width of the caption embedding, or 0 when records hold tokens only (a trainable text encoder).
    start_latents: whether records hold, per shot, the latents of (its first frame, then black frames): the I2V
      first-frame channels (``config.model.first_frame`` is not 'none').
    image_size: (H_i, W_i) of the stored image-encoder input per latent frame, or None (no image cross-attention).
    temporal_stride, causal: how latent frames group pixel frames (:func:`pseudo_labels.latent_frame_groups`).
  """

  latent_shape: tuple[int, int, int, int]
  frames_per_shot: int
  height: int
  width: int
  text_len: int
  text_dim: int
  start_latents: bool
  image_size: tuple[int, int] | None
  temporal_stride: int
  causal: bool

  @classmethod
  def from_config(cls, config) -> "RecordLayout":
    d = config.data
    codec = codec_lib.make_codec(config)
    t, h, w = int(d.frames_per_shot), int(d.height), int(d.width)
    first_frame = config.model.get("first_frame", "channels" if config.model.i2v else "none")
    size = image_input_size(config)
    return cls(
        latent_shape=tuple(int(v) for v in codec.latent_shape(t, h, w)),
        frames_per_shot=t,
        height=h,
        width=w,
        text_len=int(d.text_len),
        text_dim=int(te.text_dim(config)) if text_is_frozen(config) else 0,
        start_latents=first_frame != "none",
        image_size=None if size is None else tuple(int(v) for v in size),
        temporal_stride=int(codec.stride[0]),
        causal=isinstance(codec, codec_lib.WanVAECodec),
    )

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "RecordLayout":
    kw = dict(d)
    kw["latent_shape"] = tuple(kw["latent_shape"])
    kw["image_size"] = None if kw["image_size"] is None else tuple(kw["image_size"])
    return cls(**kw)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def representative_frames(self) -> np.ndarray:
    """Index of the pixel frame that stands for each latent frame in ``images``: the first of its group."""
    from onestory_jax.data import pseudo_labels  # pylint: disable=g-import-not-at-top

    return pseudo_labels.latent_frame_groups(self.frames_per_shot, self.temporal_stride, self.causal)[:, 0]

  def mismatches(self, other: "RecordLayout") -> list[str]:
    """Fields where ``other`` differs from this layout, as 'field: a vs b' lines."""
    return [
        f"{f.name}: {getattr(self, f.name)!r} vs {getattr(other, f.name)!r}"
        for f in dataclasses.fields(self)
        if getattr(self, f.name) != getattr(other, f.name)
    ]


def example_spec(config) -> dict[str, tuple[tuple[int, ...], Any]]:
  """Shape and dtype of each field of one training sample read from records (``config.data.source='multishot'``).

  ::

    latents       float32 [3, F, h, w, C]  memory shot 0, memory shot 1, target (stored latents; no VAE in the step)
    tokens        int32   [text_len]       target caption (its padding masks the caption in Frame Selection)
    text          float32 [text_len, D_t]  target caption embedding (only when the config freezes the text encoder)
    sel_labels    float32 [2, F]           pseudo-label per memory latent frame (App. A.2; -1 / 0 for synthetic shots)
    start_latents float32 [F, h, w, C]     the target's first-frame latents (only with a first-frame path)
    images        uint8   [3, F, Hi, Wi, 3] image-encoder input per latent frame (only with image cross-attention)
    real_first, memory_shots, synthetic, story: as in :func:`onestory_jax.data.pipeline.example_spec`
  """
  layout = RecordLayout.from_config(config)
  f = layout.latent_shape
  spec: dict[str, tuple[tuple[int, ...], Any]] = {
      "latents": ((3,) + f, np.float32),
      "tokens": ((layout.text_len,), np.int32),
      "sel_labels": ((2, f[0]), np.float32),
      "real_first": ((2,), np.bool_),
      "memory_shots": ((2,), np.int32),
      "synthetic": ((), np.bool_),
      "story": ((), np.int32),
  }
  if layout.text_dim:
    spec["text"] = ((layout.text_len, layout.text_dim), np.float32)
  if layout.start_latents:
    spec["start_latents"] = (f, np.float32)
  if layout.image_size is not None:
    spec["images"] = ((3, f[0]) + layout.image_size + (3,), np.uint8)
  return spec
