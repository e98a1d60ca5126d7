"""Shot filters: per-frame features gathered while a video decodes, per-shot statistics, and the rules that reject
shots (each a :class:`CurationConfig` threshold), plus the registry of shot embeddings for the duplicate rule.

Rules, in the order they are tried (a shot gets the first reason that applies):

* ``too_short`` / ``too_long``: duration outside [shortest_shot_seconds, max_shot_seconds];
* ``black``: mean luma (BT.601, 0..255, over the shot's frames) below ``black_luma``;
* ``static``: mean absolute difference between consecutive frames of the shot (over pixels and RGB channels,
  0..255) below ``static_motion``;
* ``duplicate``: cosine similarity of the shot's embedding with the previous shot's (the shot just before it in the
  video, whatever happened to that one) above ``duplicate_similarity``.

The default embedding (``thumbnail``) is a cheap proxy for the paper's DINOv2 similarity: the mean of the shot's
keyframes, scaled to 16x16 RGB, minus its mean value, so a change of exposure alone (a false cut) leaves it as it is.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import cv2
import numpy as np

from onestory_jax.data.curation.config import CurationConfig

# An embedding: a shot's keyframes (uint8 [N, h, w, 3], N >= 1) -> a vector; similarity is their cosine.
Embedding = Callable[[np.ndarray], np.ndarray]


class FrameFeatures:
  """What the filters need from each analysis frame, gathered in one pass: mean luma, mean absolute (RGB) change
  from the previous frame, and every ``stride``-th frame (keyframes, for the shot embedding)."""

  def __init__(self, config: CurationConfig):
    self.stride = max(1, round(config.fps / config.keyframes_per_second))
    self.luma: list[float] = []
    self.motion: list[float] = []
    self.keyframes: dict[int, np.ndarray] = {}
    self._previous: np.ndarray | None = None

  def add(self, frame: np.ndarray) -> None:
    k = len(self.luma)
    self.luma.append(float(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY).mean()))
    self.motion.append(0.0 if self._previous is None else float(cv2.absdiff(frame, self._previous).mean()))
    self._previous = frame
    if k % self.stride == 0:
      self.keyframes[k] = frame

  def __len__(self) -> int:
    return len(self.luma)

  def shot_keyframes(self, start: int, end: int) -> np.ndarray | None:
    """The keyframes in [start, end), uint8 [N, h, w, 3]; None if there are none."""
    first = -(-start // self.stride) * self.stride
    frames = [self.keyframes[k] for k in range(first, end, self.stride)]
    return np.stack(frames) if frames else None


def thumbnail_embedding(keyframes: np.ndarray) -> np.ndarray:
  """The mean of the keyframes at 16x16 RGB, mean-centred (float32 [768])."""
  small = [cv2.resize(f, (16, 16), interpolation=cv2.INTER_AREA).astype(np.float32) for f in keyframes]
  v = np.mean(small, axis=0).ravel()
  return v - v.mean()


def _thumbnail(config: CurationConfig) -> Embedding:
  del config
  return thumbnail_embedding


_SIMILARITIES: dict[str, Callable[[CurationConfig], Embedding]] = {"thumbnail": _thumbnail}


def register_similarity(name: str, factory: Callable[[CurationConfig], Embedding]) -> None:
  """Makes ``factory(config)`` the embedding called ``name`` (``CurationConfig.similarity``, ``--similarity``). The
  embedding is made once per run and pickled to worker processes (``--workers`` > 1)."""
  _SIMILARITIES[name] = factory


def similarity_names() -> list[str]:
  return sorted(_SIMILARITIES)


def make_similarity(config: CurationConfig) -> Embedding:
  if config.similarity not in _SIMILARITIES:
    raise ValueError(
        f"CurationConfig.similarity: unknown similarity {config.similarity!r}; known: {similarity_names()}"
    )
  return _SIMILARITIES[config.similarity](config)


def cosine(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
  """Cosine similarity; None if either is missing, 0 if either is all zeros."""
  if a is None or b is None:
    return None
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  norm = np.linalg.norm(a) * np.linalg.norm(b)
  return float(a @ b / norm) if norm > 1e-12 else 0.0


@dataclasses.dataclass(frozen=True)
class ShotStats:
  """A shot's numbers, as the rules see them (also written to the per-video record).

  Attributes:
    luma: mean luma, 0..255.
    motion: mean absolute difference between consecutive frames (pixels and RGB channels), 0..255 (0 for a
      one-frame shot).
    similarity: cosine similarity with the previous shot's embedding (None for the first shot, or where a shot has
      no keyframe).
  """

  luma: float
  motion: float
  similarity: float | None


def shot_stats(features: FrameFeatures, shots: list[tuple[int, int]], embed: Embedding) -> list[ShotStats]:
  out, previous = [], None
  for start, end in shots:
    keyframes = features.shot_keyframes(start, end)
    embedding = None if keyframes is None else embed(keyframes)
    motion = features.motion[start + 1 : end]
    out.append(
        ShotStats(
            luma=float(np.mean(features.luma[start:end])),
            motion=float(np.mean(motion)) if motion else 0.0,
            similarity=cosine(embedding, previous),
        )
    )
    previous = embedding
  return out


def judge(stats: ShotStats, start: int, end: int, config: CurationConfig) -> tuple[str, str] | None:
  """(reason, message) of the first rule that rejects the shot [start, end) (frames at config.fps), or None."""
  seconds = (end - start) / config.fps
  if seconds < config.shortest_shot_seconds - 1e-9:
    return "too_short", f"{seconds:.2f} s < {config.shortest_shot_seconds:.2f} s"
  if seconds > config.max_shot_seconds + 1e-9:
    return "too_long", f"{seconds:.2f} s > {config.max_shot_seconds:.2f} s"
  if stats.luma < config.black_luma:
    return "black", f"mean luma {stats.luma:.1f} < {config.black_luma:g}"
  if stats.motion < config.static_motion:
    return "static", f"mean frame difference {stats.motion:.3f} < {config.static_motion:g}"
  if stats.similarity is not None and stats.similarity > config.duplicate_similarity:
    return "duplicate", f"similarity {stats.similarity:.3f} with the previous shot > {config.duplicate_similarity:g}"
  return None
