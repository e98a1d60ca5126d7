"""The settings of a curation run (:class:`CurationConfig`), with the defaults of the paper setting."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class CurationConfig:
  """What curation decodes, detects and keeps. Every field is also a flag of ``python -m onestory_jax.data.curate``.

  The paper (OneStory, Sec. 3) names its tools (TransNetV2, a VLM, DINOv2) but none of its thresholds, so the
  defaults below are ours; docs/curation.md gives the reason for each.

  Attributes:
    fps: frame rate that videos are resampled to (Wan: 16). Shot times and frame indices in the outputs are on this
      grid: frame k is shown at k / fps seconds.
    frames_per_shot: frames of one training shot (Wan: 81). Each kept shot names a clip of this many frames centred
      in it; the default shortest shot is this long.
    height: frame height that training reads (Wan 480p: 480).
    width: frame width that training reads (Wan 480p: 832). Frames are scaled to cover height x width and
      centre-cropped.
    analysis_size: longer side, in pixels, of the small copy of each frame that shot detection and the filters look
      at (the target crop, scaled down).
    detector: shot detector: 'adaptive' (PySceneDetect's AdaptiveDetector), 'content' (its ContentDetector) or one
      registered with :func:`onestory_jax.data.curation.shots.register_detector` (TransNetV2, for example).
    detector_threshold: the detector's threshold; None takes PySceneDetect's default (3 for 'adaptive': a ratio
      to the neighbouring frames' change; 27 for 'content': an absolute HSV change).
    detector_min_scene_seconds: the detector reports no two cuts closer than this (its flash filter).
    min_shot_seconds: shots shorter than this are rejected ('too_short'); None means frames_per_shot / fps, so
      every kept shot holds a whole training clip.
    max_shot_seconds: shots longer than this are rejected ('too_long'; often a missed gradual transition).
    black_luma: a shot whose mean luma (BT.601, 0..255) is below this is rejected ('black').
    static_motion: a shot whose mean absolute difference between consecutive frames (over pixels and RGB channels,
      0..255) is below this is rejected ('static': a still image, a frozen frame).
    duplicate_similarity: a shot whose embedding has cosine similarity above this with the previous shot's is
      rejected ('duplicate': usually a false cut, such as a lighting change, inside one shot).
    similarity: the shot embedding for 'duplicate': 'thumbnail' (mean-centred 16x16 thumbnails) or one registered
      with :func:`onestory_jax.data.curation.filters.register_similarity` (DINOv2, for example).
    keyframes_per_second: rate of the analysis frames kept in memory for the shot embedding (a shot shorter than
      1 / keyframes_per_second may hold none; it is then never a 'duplicate').
    caption_frames: frames of each shot's clip, spread evenly over it at height x width, that a captioner which
      looks at pixels gets (a lookup such as the JSONL captions gets none).
    max_shots_per_unit: story units have 2 to this many consecutive shots (2 or 3: the paper's 2- and 3-shot
      videos).
  """

  fps: float = 16.0
  frames_per_shot: int = 81
  height: int = 480
  width: int = 832
  analysis_size: int = 128
  detector: str = "adaptive"
  detector_threshold: float | None = None
  detector_min_scene_seconds: float = 0.5
  min_shot_seconds: float | None = None
  max_shot_seconds: float = 60.0
  black_luma: float = 16.0
  static_motion: float = 0.1
  duplicate_similarity: float = 0.9
  similarity: str = "thumbnail"
  keyframes_per_second: float = 2.0
  caption_frames: int = 4
  max_shots_per_unit: int = 3

  def __post_init__(self):
    def need(ok: bool, field: str, what: str) -> None:
      if not ok:
        raise ValueError(f"CurationConfig.{field} must be {what}, got {getattr(self, field)!r}")

    def number(field: str) -> bool:
      value = getattr(self, field)
      return isinstance(value, (int, float)) and not isinstance(value, bool)

    def integer(field: str) -> bool:
      value = getattr(self, field)
      return isinstance(value, int) and not isinstance(value, bool)

    for field in ("fps", "keyframes_per_second", "max_shot_seconds"):
      need(number(field) and getattr(self, field) > 0, field, "a number > 0")
    for field in ("detector_min_scene_seconds", "black_luma", "static_motion"):
      need(number(field) and getattr(self, field) >= 0, field, "a number >= 0")
    need(
        number("duplicate_similarity") and 0 <= self.duplicate_similarity <= 1,
        "duplicate_similarity",
        "a number in [0, 1]",
    )
    for field in ("frames_per_shot", "caption_frames"):
      need(integer(field) and getattr(self, field) >= 1, field, "an int >= 1")
    for field in ("height", "width", "analysis_size"):
      need(integer(field) and getattr(self, field) >= 8, field, "an int >= 8")
    need(isinstance(self.detector, str) and bool(self.detector), "detector", "a detector name")
    need(
        self.detector_threshold is None or (number("detector_threshold") and self.detector_threshold > 0),
        "detector_threshold",
        "None or a number > 0",
    )
    need(
        self.min_shot_seconds is None or (number("min_shot_seconds") and self.min_shot_seconds >= 0),
        "min_shot_seconds",
        "None or a number >= 0",
    )
    need(self.shortest_shot_seconds <= self.max_shot_seconds, "max_shot_seconds", "at least the shortest shot")
    need(isinstance(self.similarity, str) and bool(self.similarity), "similarity", "a similarity name")
    need(self.max_shots_per_unit in (2, 3), "max_shots_per_unit", "2 or 3")

  @property
  def shortest_shot_seconds(self) -> float:
    """``min_shot_seconds``, or one training clip (frames_per_shot / fps) where it is None."""
    return self.frames_per_shot / self.fps if self.min_shot_seconds is None else float(self.min_shot_seconds)

  @property
  def analysis_shape(self) -> tuple[int, int]:
    """(height, width) of the analysis frames: the target aspect ratio, longer side ``analysis_size`` (never larger
    than the target)."""
    scale = min(1.0, self.analysis_size / max(self.height, self.width))
    return max(8, round(self.height * scale)), max(8, round(self.width * scale))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_config(cls, data: Any, **overrides: Any) -> CurationConfig:
    """The fields that ``data`` (an ml_collections ConfigDict, a dict, any object) has, then ``overrides``; the rest
    keep their defaults. Unknown override names raise ValueError."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
      raise ValueError(f"CurationConfig.from_config: unknown fields {unknown}")
    values = {}
    for name in names:
      value = data.get(name) if isinstance(data, dict) else getattr(data, name, None)
      if value is not None:
        values[name] = value
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)
