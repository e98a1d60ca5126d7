r"""Narrative metrics on real video: C-Cons and E-Cons from DINOv2, caption alignment from CLIP.

OneStory (arXiv 2512.07802, Sec. 5.1) scores a generated multi-shot video with three narrative metrics, following
ShotAdapter's protocol:

* **Character consistency (C-Cons):** DINOv2 similarity between the segmented characters (YOLO person masks in the
  paper) of shots annotated as sharing a character.
* **Environment consistency (E-Cons):** DINOv2 similarity between the segmented background regions of shots
  annotated with the same environment.
* **Semantic alignment (S-Align):** the paper uses ViCLIP (InternVid), a video CLIP. ViCLIP has no JAX port, so
  ``caption_alignment`` here is an image CLIP's (:mod:`onestory_jax.models.clip_text`): a shot's mean, over its
  sampled frames, of the cosine between the caption's and the frame's CLIP embeddings. Figures are therefore not
  comparable with the paper's S-Align column.

The paper leaves open the DINOv2 variant, the frames, the region features and the aggregation; these are ours:

1. *Frames.* ``frames_per_shot`` frames evenly spaced over each shot, first and last included.
2. *Regions.* A :class:`MaskSource` gives, per shot, one boolean mask ``[T, H, W]`` per annotated character. A
   character is *in view* in a frame when its mask covers at least ``min_region_fraction`` of the frame. Its region
   image is the mask's bounding box, with the pixels outside the mask set to the DINOv2 normalisation mean (zero after
   normalisation), letterboxed to a square with the same colour and resized (PIL bicubic) to ``image_size``. The
   background image is the whole frame with every character mask of the shot filled the same way, letterboxed and
   resized; it counts when at least ``min_region_fraction`` of the frame is left.
   *Whole-frame fallback* (no masks): the character region and the background are both the whole frame, so C-Cons
   and E-Cons then measure whole-frame similarity over the annotated pairs; the output's ``regions`` says which.
3. *Features.* DINOv2's ``pooler_output`` (the CLS token after the final norm) of each region image, L2-normalised.
4. *Similarity of a pair.* For shots i < j that share character c, with unit features u_{i,t} and u_{j,s} over the
   frames in view: ``sim = mean_{t,s} <u_{i,t}, u_{j,s}> = <mean_t u_{i,t}, mean_s u_{j,s}>``. The same for the
   backgrounds of shots sharing an environment.
5. *Aggregation.* C-Cons is the mean over every (pair, shared character) with the character in view in both shots;
   E-Cons the mean over every pair sharing an environment. Pairs that cannot be scored are listed under ``unscored``.

Masks come from a :class:`MaskSource`: :class:`NpzMasks` reads the user's masks (one npz file, key
``shot_{i}.character_{c}``, a bool or uint8 ``[T, H, W]`` array per annotated character of each shot; an all-zero
mask marks a character out of view); :class:`WholeFrame` is the fallback. A detector (the paper's YOLO, or any
segmenter) plugs in as a class with the same ``masks`` method, registered by name with :func:`register_mask_backend`
and selected as ``--masks=NAME:PATH`` (the path of its weights). No detector ships: YOLO has no JAX port.
docs/metrics.md gives the same definitions.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from onestory_jax import story as story_lib
from onestory_jax.data import pseudo_labels
from onestory_jax.models import clip_text
from onestory_jax.models import dinov2 as dinov2_lib
from onestory_jax.models.wan import clip as vision_lib


# ----------------------------------------------------------------------------- masks
class MaskSource(Protocol):
  """Where the character regions come from."""

  name: str  # "masks" for real masks; "whole_frame" for the fallback

  def masks(self, shot: int, frames: np.ndarray, characters: Sequence[int]) -> dict[int, np.ndarray] | None:
    """Bool ``[T, H, W]`` per character id of the shot (True on the character), or None: no masks (whole frame)."""


class WholeFrame:
  """The fallback: no masks; characters and background are the whole frame."""

  name = "whole_frame"

  def masks(self, shot: int, frames: np.ndarray, characters: Sequence[int]) -> None:
    del shot, frames, characters
    return None


def mask_key(shot: int, character: int) -> str:
  """The npz key of one character's masks in one shot: ``shot_{i}.character_{c}``."""
  return f"shot_{shot}.character_{character}"


class NpzMasks:
  """User-supplied masks: one npz file (never a pickle), key :func:`mask_key`, bool / uint8 ``[T, H, W]`` each."""

  name = "masks"

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise ValueError(f"{path}: masks file not found (expected an npz with keys shot_{{i}}.character_{{c}})")
    self.path = path
    try:
      with np.load(path, allow_pickle=False) as data:
        self._data = {k: data[k] for k in data.files}
    except (ValueError, OSError) as e:
      raise ValueError(f"{path}: not a readable npz file of arrays ({e})") from e

  def check_story(self, story: story_lib.Story) -> None:
    """ValueError naming every key that is no character of its shot."""
    expected = {mask_key(i, c) for i, s in enumerate(story.shots) for c in (s.characters or ())}
    extra = sorted(set(self._data) - expected)
    if extra:
      raise ValueError(
          f"{self.path}: keys {extra} name no annotated character of their shot (expected keys among "
          f"{sorted(expected) or 'none: the story annotates no characters'})"
      )

  def masks(self, shot: int, frames: np.ndarray, characters: Sequence[int]) -> dict[int, np.ndarray]:
    out = {}
    for c in characters:
      key = mask_key(shot, c)
      if key not in self._data:
        raise ValueError(
            f"{self.path}: missing key {key!r}: every annotated character of every shot needs masks (an all-zero "
            "array marks a character out of view)"
        )
      m = self._data[key]
      if m.dtype not in (np.bool_, np.uint8) or m.shape != frames.shape[:3]:
        raise ValueError(
            f"{self.path}: {key}: expected a bool or uint8 array of shape {list(frames.shape[:3])} (the shot's "
            f"[T, H, W]), got {m.dtype} {list(m.shape)}"
        )
      out[c] = m.astype(bool)
    return out


MASK_BACKENDS: dict[str, Callable[[str], MaskSource]] = {"npz": NpzMasks}


def register_mask_backend(name: str, factory: Callable[[str], MaskSource]) -> None:
  """Makes ``--masks=NAME:PATH`` build ``factory(PATH)`` (a detector loaded from local weights, for instance)."""
  MASK_BACKENDS[name] = factory


def mask_source(spec: str | None) -> MaskSource:
  """``None`` -> :class:`WholeFrame`; ``PATH.npz`` -> :class:`NpzMasks`; ``NAME:PATH`` -> a registered backend."""
  if not spec:
    return WholeFrame()
  name, sep, path = spec.partition(":")
  if sep and name in MASK_BACKENDS:
    return MASK_BACKENDS[name](path)
  if sep and not os.path.exists(spec):
    raise ValueError(f"--masks={spec}: unknown mask backend {name!r} (registered: {sorted(MASK_BACKENDS)})")
  return NpzMasks(spec)


# ----------------------------------------------------------------------------- region images
def frame_indices(num_frames: int, k: int) -> np.ndarray:
  """``k`` frame indices evenly spaced over ``num_frames`` (first and last included; all when there are fewer)."""
  if k < 1:
    raise ValueError(f"frames_per_shot must be >= 1, got {k}")
  return np.unique(np.round(np.linspace(0, num_frames - 1, min(k, num_frames))).astype(np.int64))


def _letterbox(image: np.ndarray, size: int, fill: np.ndarray) -> np.ndarray:
  """uint8 ``[h, w, 3]`` -> centred on a square of ``fill`` colour, resized (PIL bicubic) to ``[size, size, 3]``."""
  h, w, _ = image.shape
  side = max(h, w)
  canvas = np.empty((side, side, 3), np.uint8)
  canvas[:] = fill
  y, x = (side - h) // 2, (side - w) // 2
  canvas[y : y + h, x : x + w] = image
  if side == size:
    return canvas
  return np.asarray(Image.fromarray(canvas).resize((size, size), Image.BICUBIC))


def region_image(frame: np.ndarray, mask: np.ndarray, size: int, fill: np.ndarray) -> np.ndarray:
  """The character image: the mask's bounding box, outside-mask pixels set to ``fill``, letterboxed to ``size``."""
  rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
  y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
  crop = np.where(mask[y0:y1, x0:x1, None], frame[y0:y1, x0:x1], fill).astype(np.uint8)
  return _letterbox(crop, size, fill)


def background_image(frame: np.ndarray, characters: np.ndarray | None, size: int, fill: np.ndarray) -> np.ndarray:
  """The whole frame with the characters' pixels (``characters``: bool ``[H, W]``, or None) set to ``fill``."""
  image = frame if characters is None else np.where(characters[..., None], fill, frame).astype(np.uint8)
  return _letterbox(image, size, fill)


# ----------------------------------------------------------------------------- encoders
@functools.partial(jax.jit, static_argnums=0)
def _dino_features(module: dinov2_lib.Dinov2Model, params: Any, stats: jax.Array, images: jax.Array) -> jax.Array:
  x = (images.astype(jnp.float32) / 255.0 - stats[0]) / stats[1]
  return module.apply({"params": params}, x).pooler_output.astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _clip_image_features(module: clip_text.CLIPModel, shortest_edge: int, params, stats, frames) -> jax.Array:
  pixels = vision_lib.preprocess(
      frames.astype(jnp.float32) / 127.5 - 1.0,
      crop_size=module.vision["image_size"],
      shortest_edge=shortest_edge,
      mean=stats[0],
      std=stats[1],
  )
  return module.apply({"params": params}, pixels, method="image_features").astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _clip_text_features(module: clip_text.CLIPModel, params, ids, mask) -> jax.Array:
  return module.apply({"params": params}, ids, mask, method="text_features").astype(jnp.float32)


def _batched(fn: Callable[[np.ndarray], Any], items: np.ndarray, batch: int) -> np.ndarray:
  """``fn`` over ``items`` in fixed-size batches (the last padded with its first item), so one compile serves all."""
  out = []
  for start in range(0, len(items), batch):
    chunk = items[start : start + batch]
    n = len(chunk)
    if n < batch:
      chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch - n, axis=0)])
    out.append(np.asarray(fn(chunk))[:n])
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclasses.dataclass
class Encoders:
  """DINOv2 (for C-Cons and E-Cons) and CLIP (for caption alignment); either may be None (its metrics are skipped).

  Attributes:
    dino / dino_params / dino_mean / dino_std: the DINOv2 tower (:func:`onestory_jax.models.dinov2.load_dinov2`) and
      its normalisation (``preprocessor_config.json`` next to the weights, else ImageNet's).
    clip / clip_params / clip_tokenizer / clip_processor: the joint CLIP (:func:`onestory_jax.models.clip_text.
      load_clip`).
    image_size: the side of the region images DINOv2 sees (224).
    batch_size: images per compiled call.
  """

  dino: dinov2_lib.Dinov2Model | None = None
  dino_params: Any = None
  dino_mean: tuple[float, ...] = dinov2_lib.IMAGENET_MEAN
  dino_std: tuple[float, ...] = dinov2_lib.IMAGENET_STD
  clip: clip_text.CLIPModel | None = None
  clip_params: Any = None
  clip_tokenizer: clip_text.CLIPTokenizer | None = None
  clip_processor: dict | None = None
  image_size: int = 224
  batch_size: int = 16

  @classmethod
  def from_pretrained(cls, dinov2_dir: str | None = None, clip_dir: str | None = None, **kwargs) -> "Encoders":
    """Loads the towers from transformers ``save_pretrained`` folders (a ``Dinov2Model``; a ``CLIPModel``)."""
    if not dinov2_dir and not clip_dir:
      raise ValueError("the narrative metrics need --dinov2=DIR, --clip=DIR or both")
    enc = {}
    if dinov2_dir:
      dino, params = dinov2_lib.load_dinov2(dinov2_dir)
      mean, std = pseudo_labels.processor_stats(dinov2_dir, dinov2_lib.IMAGENET_MEAN, dinov2_lib.IMAGENET_STD)
      enc.update(dino=dino, dino_params=params, dino_mean=mean, dino_std=std)
    if clip_dir:
      clip, params, tokenizer, processor = clip_text.load_clip(clip_dir)
      enc.update(clip=clip, clip_params=params, clip_tokenizer=tokenizer, clip_processor=processor)
    return cls(**enc, **kwargs)

  @property
  def fill(self) -> np.ndarray:
    """The uint8 colour of masked-out pixels: DINOv2's normalisation mean, so they are zero after normalisation."""
    return np.round(np.asarray(self.dino_mean) * 255).astype(np.uint8)

  def dino_features(self, images: np.ndarray) -> np.ndarray:
    """uint8 ``[N, S, S, 3]`` -> unit DINOv2 features ``[N, D]``."""
    stats = jnp.asarray([self.dino_mean, self.dino_std], jnp.float32)
    fn = lambda x: _dino_features(self.dino, self.dino_params, stats, jnp.asarray(x))  # noqa: E731
    return _unit(_batched(fn, images, self.batch_size))

  def clip_image_features(self, frames: np.ndarray) -> np.ndarray:
    """uint8 frames ``[N, H, W, 3]`` -> unit CLIP image embeddings ``[N, P]``."""
    p = self.clip_processor
    stats = jnp.asarray([p["mean"], p["std"]], jnp.float32)
    fn = lambda x: _clip_image_features(  # noqa: E731
        self.clip, p["shortest_edge"], self.clip_params, stats, jnp.asarray(x)
    )
    return _unit(_batched(fn, frames, self.batch_size))

  def clip_text_features(self, captions: Sequence[str]) -> np.ndarray:
    """Captions -> unit CLIP text embeddings ``[N, P]``."""
    ids, mask = self.clip_tokenizer.encode(captions)
    both = np.concatenate([ids, mask], axis=1)
    n = ids.shape[1]
    fn = lambda x: _clip_text_features(  # noqa: E731
        self.clip, self.clip_params, jnp.asarray(x[:, :n]), jnp.asarray(x[:, n:])
    )
    return _unit(_batched(fn, both, self.batch_size))


# ----------------------------------------------------------------------------- the metrics
def _mean(values: Sequence[float]) -> float | None:
  return float(np.mean(values)) if values else None


def _region_means(
    story: story_lib.Story,
    frames: Sequence[np.ndarray],
    picks: Sequence[np.ndarray],
    encoders: Encoders,
    masks: MaskSource,
    min_region_fraction: float,
    shots_out: list[dict],
) -> dict[tuple[int, int | None], np.ndarray]:
  """(shot, character id, or None for the background) -> the mean unit DINOv2 feature over the frames in view."""
  size, fill = encoders.image_size, encoders.fill
  images, owners = [], []  # owners[k]: the keys that image k stands for
  for i, (spec, pick) in enumerate(zip(story.shots, picks)):
    chars = list(spec.characters or ())
    shot_masks = masks.masks(i, frames[i], chars)
    need = max(min_region_fraction * frames[i].shape[1] * frames[i].shape[2], 1)
    in_view = {c: 0 for c in chars}
    for t in pick:
      frame = frames[i][t]
      if shot_masks is None:  # one whole-frame image stands for every character and the background
        images.append(background_image(frame, None, size, fill))
        owners.append([(i, c) for c in chars] + [(i, None)])
        in_view = {c: n + 1 for c, n in in_view.items()}
        continue
      union = np.zeros(frame.shape[:2], bool)
      for c in chars:
        m = shot_masks[c][t]
        union |= m
        if m.sum() >= need:
          images.append(region_image(frame, m, size, fill))
          owners.append([(i, c)])
          in_view[c] += 1
      if (~union).sum() >= need:
        images.append(background_image(frame, union, size, fill))
        owners.append([(i, None)])
    shots_out[i]["character_frames_in_view"] = {str(c): n for c, n in in_view.items()}
  if not images:
    return {}
  feats = encoders.dino_features(np.stack(images))
  rows: dict[tuple[int, int | None], list[int]] = {}
  for k, keys in enumerate(owners):
    for key in keys:
      rows.setdefault(key, []).append(k)
  return {key: feats[r].mean(axis=0) for key, r in rows.items()}


def score_story(
    story: story_lib.Story,
    frames: Sequence[np.ndarray],
    encoders: Encoders,
    masks: MaskSource | None = None,
    *,
    frames_per_shot: int = 8,
    min_region_fraction: float = 0.005,
    source: str = "frames",
) -> dict:
  """C-Cons, E-Cons and caption alignment of one generated story (see the module docstring).

  Args:
    story: the annotations (captions; ``characters`` and ``environment`` per shot where the story has them).
    frames: one uint8 ``[T, H, W, 3]`` array per shot.
    encoders: the towers; a metric whose tower is None is reported as None.
    masks: the character regions (default: :class:`WholeFrame`).
    frames_per_shot: frames sampled per shot.
    min_region_fraction: the share of a frame a region needs to count as in view.
    source: what error messages call the frames (the samples folder, for the CLI).

  Returns:
    A JSON-serialisable dict: ``character_consistency``, ``environment_consistency``, ``caption_alignment`` (None
    when undefined or its tower is absent), their counts, ``regions`` (``masks`` or ``whole_frame``), and the
    per-pair and per-shot records.
  """
  masks = masks or WholeFrame()
  if len(frames) != len(story.shots):
    raise ValueError(f"expected {len(story.shots)} shots of frames (one per story shot), got {len(frames)}")
  for i, f in enumerate(frames):
    if not isinstance(f, np.ndarray) or f.dtype != np.uint8 or f.ndim != 4 or f.shape[-1] != 3 or not len(f):
      got = f"{f.dtype} {list(f.shape)}" if isinstance(f, np.ndarray) else type(f).__name__
      raise ValueError(f"{source}: shot {i}: expected uint8 frames [T, H, W, 3] with T >= 1, got {got}")
  if not 0.0 <= min_region_fraction < 1.0:
    raise ValueError(f"min_region_fraction must be in [0, 1), got {min_region_fraction}")
  if hasattr(masks, "check_story"):
    masks.check_story(story)
  picks = [frame_indices(len(f), frames_per_shot) for f in frames]
  shots_out = [{"shot": i, "frames": [int(t) for t in pick]} for i, pick in enumerate(picks)]

  char_pairs, env_pairs, unscored = [], [], []
  if encoders.dino is not None:
    mean_of = _region_means(story, frames, picks, encoders, masks, min_region_fraction, shots_out)
    n = len(story.shots)
    for i in range(n):
      for j in range(i + 1, n):
        a, b = story.shots[i], story.shots[j]
        for c in sorted(set(a.characters or ()) & set(b.characters or ())):
          if (i, c) in mean_of and (j, c) in mean_of:
            char_pairs.append({"shots": [i, j], "character": c, "similarity": float(mean_of[i, c] @ mean_of[j, c])})
          else:
            unscored.append({"shots": [i, j], "character": c, "why": "the character is out of view in a shot"})
        if a.environment is not None and a.environment == b.environment:
          if (i, None) in mean_of and (j, None) in mean_of:
            sim = float(mean_of[i, None] @ mean_of[j, None])
            env_pairs.append({"shots": [i, j], "environment": a.environment, "similarity": sim})
          else:
            unscored.append({"shots": [i, j], "environment": a.environment, "why": "no background left in a shot"})

  scores = []
  if encoders.clip is not None:
    text = encoders.clip_text_features(story.captions)
    for i, (f, pick) in enumerate(zip(frames, picks)):  # shot by shot: shots may differ in size
      shots_out[i]["caption_alignment"] = float((encoders.clip_image_features(f[pick]) @ text[i]).mean())
      scores.append(shots_out[i]["caption_alignment"])
  return {
      "character_consistency": _mean([p["similarity"] for p in char_pairs]),
      "environment_consistency": _mean([p["similarity"] for p in env_pairs]),
      "caption_alignment": _mean(scores),
      "num_character_pairs": len(char_pairs),
      "num_environment_pairs": len(env_pairs),
      "num_shots": len(frames),
      "regions": masks.name,
      "frames_per_shot": int(frames_per_shot),
      "character_pairs": char_pairs,
      "environment_pairs": env_pairs,
      "unscored": unscored,
      "shots": shots_out,
  }


def headline(metrics: dict) -> str:
  """The narrative figures in one line."""
  fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
  return (
      f"character consistency {fmt(metrics['character_consistency'])} ({metrics['num_character_pairs']} pairs), "
      f"environment consistency {fmt(metrics['environment_consistency'])} ({metrics['num_environment_pairs']} "
      f"pairs), caption alignment {fmt(metrics['caption_alignment'])} ({metrics['num_shots']} shots); regions: "
      f"{metrics['regions'].replace('_', ' ')}"
  )
