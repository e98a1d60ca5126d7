"""Per-shot captions: the :class:`Captioner` interface, the paper's two-stage scheme, and the JSONL backend.

The paper (Sec. 3) captions in two stages: each shot on its own, then each later caption is rewritten given the
previous shot's frames and caption, so that it refers back ("the same man, now in a white shirt"). A
:class:`TwoStageCaptioner` implements exactly that from two methods; a vision-language model backend subclasses it.

:class:`JsonlCaptions` reads captions that already exist, one JSON object per video and line::

  {"video": "clip_001.mp4", "shots": [{"start": 0.0, "end": 4.2, "caption": "A man ..."}, ...]}

A caption goes to the detected shot whose time range overlaps its own with an intersection over union above
``min_iou`` (default 0.5: then no caption can go to two shots, nor two non-overlapping captions to one shot).
"""

from __future__ import annotations

import abc
import json
import os
from typing import Any, Protocol, Sequence

import numpy as np

Span = tuple[float, float]


class Captioner(Protocol):
  """Captions the shots of one story unit (or, for a lookup, any shots of one video).

  Attributes:
    needs_frames: True for captioners that look at pixels; curation then decodes each story unit's shots and calls
      :meth:`caption_shots` once per unit, in shot order, so that a referential rewrite never refers outside its unit.
      False for lookups: they are called once per video with every shot that passed the filters, and frames are None.
  """

  needs_frames: bool

  def caption_shots(
      self, frames_per_shot: Sequence[np.ndarray | None], *, video: str, spans: Sequence[Span]
  ) -> list[str | None]:
    """One caption per shot (None or "" where there is none). ``frames_per_shot[i]`` is uint8 [T, H, W, 3] (the
    shot's clip, ``caption_frames`` frames spread over it); ``spans[i]`` its (start, end) in seconds; ``video`` the
    source file's absolute path."""

  def cache_key(self, video: str) -> Any:
    """A JSON-able value that changes whenever this captioner's captions for ``video`` would (model, prompts,
    caption file entries): a finished video whose key changed is curated again."""


class TwoStageCaptioner(abc.ABC):
  """The paper's two-stage referential captioning: subclasses say how to caption one shot and how to rewrite a
  caption given the previous shot; :meth:`caption_shots` runs stage 1 on every shot, then stage 2 on every shot
  after the first, against the previous shot's final (already rewritten) caption."""

  needs_frames = True

  @abc.abstractmethod
  def caption(self, frames: np.ndarray) -> str:
    """Stage 1: a caption of one shot from its frames alone."""

  @abc.abstractmethod
  def rewrite(self, caption: str, frames: np.ndarray, previous_caption: str, previous_frames: np.ndarray) -> str:
    """Stage 2: ``caption`` of the shot ``frames`` rewritten to refer to the previous shot (its frames and caption):
    the same people and places named as such, and what changed."""

  def cache_key(self, video: str) -> Any:
    return type(self).__qualname__

  def caption_shots(
      self, frames_per_shot: Sequence[np.ndarray | None], *, video: str = "", spans: Sequence[Span] = ()
  ) -> list[str | None]:
    del video, spans
    first = [self.caption(frames) for frames in frames_per_shot]
    out: list[str | None] = []
    for i, (caption, frames) in enumerate(zip(first, frames_per_shot)):
      if i and caption and out[-1]:
        caption = self.rewrite(caption, frames, out[-1], frames_per_shot[i - 1])
      out.append(caption or None)
    return out


def iou(a: Span, b: Span) -> float:
  inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
  union = max(a[1], b[1]) - min(a[0], b[0])
  return inter / union if union > 0 else 0.0


def match_captions(spans: Sequence[Span], captioned: Sequence[tuple[float, float, str]], min_iou: float) -> list:
  """Per detected shot span, the caption of the captioned range with the largest IoU, if above ``min_iou``; else
  None."""
  out = []
  for span in spans:
    best, caption = 0.0, None
    for start, end, text in captioned:
      score = iou(span, (start, end))
      if score > best:
        best, caption = score, text
    out.append(caption if best > min_iou else None)
  return out


class JsonlCaptions:
  """Captions from a JSONL file (module docstring), matched to detected shots by time.

  A line's ``video`` names its input file: by path (absolute, or relative to the captions file's folder) when it has
  a folder part, else by file name, which must then be unique among the inputs (:meth:`bind` checks). Lines for
  files that are not inputs are ignored.
  """

  needs_frames = False

  def __init__(self, path: str, min_iou: float = 0.5):
    if isinstance(min_iou, bool) or not isinstance(min_iou, (int, float)) or not 0 <= min_iou < 1:
      raise ValueError(f"--caption_min_iou (JsonlCaptions min_iou) must be in [0, 1), got {min_iou!r}")
    self.path, self.min_iou = os.fspath(path), float(min_iou)
    self._lines: list[tuple[int, str, list[tuple[float, float, str]]]] = []
    self._by_video: dict[str, int] = {}
    self._load()

  def _fail(self, line: int, problem: str) -> ValueError:
    return ValueError(f"{self.path}:{line}: {problem}")

  def _load(self) -> None:
    try:
      with open(self.path, encoding="utf-8") as f:
        text = f.read()
    except UnicodeDecodeError as e:
      raise ValueError(f"{self.path}: not UTF-8 text ({e})") from e
    except OSError as e:
      raise ValueError(f"--captions: cannot read {self.path}: {e.strerror or e}") from e
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
      if not raw.strip():
        continue
      try:
        obj = json.loads(raw)
      except json.JSONDecodeError as e:
        raise self._fail(number, f"not valid JSON ({e.msg} at column {e.colno})") from e
      if not isinstance(obj, dict):
        raise self._fail(number, f"expected a JSON object, got {type(obj).__name__}")
      video = obj.get("video")
      if not isinstance(video, str) or not video.strip():
        raise self._fail(number, "field 'video' must be a non-empty string (the video's file name or path)")
      if video in seen:
        raise self._fail(number, f"video {video!r} already has captions on line {seen[video]}")
      seen[video] = number
      shots = obj.get("shots")
      if not isinstance(shots, list):
        raise self._fail(number, 'field \'shots\' must be a list of {"start", "end", "caption"} objects')
      entries = []
      for i, shot in enumerate(shots):
        where = f"shots[{i}]"
        if not isinstance(shot, dict):
          raise self._fail(number, f"{where} must be an object with 'start', 'end' and 'caption'")
        start, end, caption = shot.get("start"), shot.get("end"), shot.get("caption")
        for name, value in (("start", start), ("end", end)):
          if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
            raise self._fail(number, f"{where}.{name} must be a number of seconds >= 0, got {value!r}")
        if end <= start:
          raise self._fail(number, f"{where}: 'end' ({end}) must be after 'start' ({start})")
        if not isinstance(caption, str) or not caption.strip():
          raise self._fail(number, f"{where}.caption must be a non-empty string")
        entries.append((float(start), float(end), caption.strip()))
      self._lines.append((number, video, entries))

  def bind(self, videos: Sequence[str]) -> None:
    """Resolves each line's ``video`` against the input files (absolute paths). ValueError (naming the line) for a
    file name that two inputs share."""
    by_name: dict[str, list[str]] = {}
    real = {os.path.realpath(v): v for v in videos}
    for v in videos:
      by_name.setdefault(os.path.basename(v), []).append(v)
    folder = os.path.dirname(os.path.abspath(self.path))
    self._by_video = {}
    for index, (number, video, _) in enumerate(self._lines):
      if os.path.dirname(video):
        match = real.get(os.path.realpath(os.path.join(folder, video)))
        matches = [match] if match else []
      else:
        matches = by_name.get(video, [])
      if len(matches) > 1:
        raise self._fail(
            number, f"video {video!r} matches {len(matches)} input files ({matches[0]}, ...): give its path"
        )
      if matches:
        self._by_video[matches[0]] = index

  def captioned(self, video: str) -> list[tuple[float, float, str]] | None:
    """The (start, end, caption) entries of ``video`` (an absolute input path), or None if it has no line."""
    index = self._by_video.get(video)
    return None if index is None else self._lines[index][2]

  def cache_key(self, video: str) -> Any:
    return {"jsonl": self.captioned(video), "min_iou": self.min_iou}

  def caption_shots(
      self, frames_per_shot: Sequence[np.ndarray | None], *, video: str, spans: Sequence[Span]
  ) -> list[str | None]:
    del frames_per_shot
    return match_captions(spans, self.captioned(video) or [], self.min_iou)
