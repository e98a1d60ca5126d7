"""Shot detection behind a small interface, with PySceneDetect's detectors as the built-in backends.

A :class:`ShotDetector` sees a video's analysis frames in order (frame k at k / fps seconds) and then returns its cuts:
the index of the first frame of every shot but the first. :func:`shots_from_cuts` turns cuts into shot ranges.

Backends are made by name through a registry (:func:`register_detector`, :func:`make_detector`). Built in:

* ``adaptive`` (default): PySceneDetect's AdaptiveDetector. A frame is a cut where its content change (HSV difference
  to the previous frame) is at least ``threshold`` (default 3) times the average change of its neighbours and at
  least 15. It catches cuts between similar-looking shots and ignores fast motion better than a fixed threshold.
* ``content``: PySceneDetect's ContentDetector, a fixed threshold (default 27) on the same content change.

TransNetV2, the paper's detector, is an open slot: register a factory that returns a ShotDetector (PySceneDetect
0.7 ships a TransNetV2 detector that needs onnxruntime and the model's ONNX weights, neither of which this project
installs).
"""

from __future__ import annotations

import functools
from typing import Callable, Protocol

import numpy as np
from scenedetect import AdaptiveDetector
from scenedetect import ContentDetector
from scenedetect import FrameTimecode

from onestory_jax.data.curation.config import CurationConfig


class ShotDetector(Protocol):
  """Finds cuts in one video's frames; a fresh detector per video."""

  def push(self, frame: np.ndarray) -> None:
    """Takes the next frame (uint8 [h, w, 3] RGB, at the curation frame rate)."""

  def cuts(self) -> list[int]:
    """After the last frame: the first frame of each shot but the first, ascending."""


class SceneDetectShots:
  """A PySceneDetect detector (``scenedetect.SceneDetector``) as a :class:`ShotDetector`."""

  def __init__(self, detector, fps: float):
    self._detector, self._fps, self._count, self._cuts = detector, float(fps), 0, []

  def push(self, frame: np.ndarray) -> None:
    bgr = np.ascontiguousarray(frame[..., ::-1])  # PySceneDetect reads OpenCV's BGR order
    found = self._detector.process_frame(FrameTimecode(self._count, fps=self._fps), bgr)
    self._cuts.extend(c.frame_num for c in found)
    self._count += 1

  def cuts(self) -> list[int]:
    if self._count:
      found = self._detector.post_process(FrameTimecode(self._count - 1, fps=self._fps))
      self._cuts.extend(c.frame_num for c in found)
    return sorted({c for c in self._cuts if 0 < c < self._count})


# Makes a fresh detector for one video from the config.
DetectorFactory = Callable[[CurationConfig], ShotDetector]


def _scenedetect(cls, threshold_arg: str, config: CurationConfig) -> ShotDetector:
  kwargs = {"min_scene_len": max(1, round(config.detector_min_scene_seconds * config.fps))}
  if config.detector_threshold is not None:
    kwargs[threshold_arg] = float(config.detector_threshold)
  return SceneDetectShots(cls(**kwargs), config.fps)


_DETECTORS: dict[str, DetectorFactory] = {
    "adaptive": functools.partial(_scenedetect, AdaptiveDetector, "adaptive_threshold"),
    "content": functools.partial(_scenedetect, ContentDetector, "threshold"),
}


def register_detector(name: str, factory: DetectorFactory) -> None:
  """Makes ``factory(config)`` the detector called ``name`` (``CurationConfig.detector``, ``--detector``). Worker
  processes (``--workers`` > 1) get the factory pickled: make it a module-level function or class."""
  _DETECTORS[name] = factory


def detector_names() -> list[str]:
  return sorted(_DETECTORS)


def detector_factory(config: CurationConfig) -> DetectorFactory:
  """The factory of ``config.detector`` (ValueError for an unknown name)."""
  if config.detector not in _DETECTORS:
    raise ValueError(f"CurationConfig.detector: unknown detector {config.detector!r}; known: {detector_names()}")
  return _DETECTORS[config.detector]


def make_detector(config: CurationConfig) -> ShotDetector:
  """A fresh detector for one video (ValueError for an unknown name)."""
  return detector_factory(config)(config)


def shots_from_cuts(cuts: list[int], num_frames: int) -> list[tuple[int, int]]:
  """[(start, end)] frame ranges (end exclusive) of the shots that ``cuts`` make of ``num_frames`` frames."""
  edges = [0] + [c for c in sorted(set(cuts)) if 0 < c < num_frames] + [num_frames]
  return [(a, b) for a, b in zip(edges[:-1], edges[1:])]
