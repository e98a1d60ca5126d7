"""Decoding with PyAV: any container and codec that FFmpeg reads, resampled to a frame rate and a frame size.

Resampling in time is sample-and-hold on exact timestamps: output frame k is shown at k / fps seconds after the
stream's start and shows the last source frame whose presentation time is at or before then. A cut at source time t
therefore starts at output frame ceil(t * fps). The video ends with its last frame's duration.

Resampling in space scales each frame to cover height x width (keeping its aspect ratio; swscale's area filter) and
crops the centre. Sample aspect ratio and rotation metadata are not applied.
"""

from __future__ import annotations

import dataclasses
import fractions
import os
from typing import Iterator

import av
import av.video.reformatter
import numpy as np


class Undecodable(Exception):
  """The file is not a video that PyAV can decode; the message says why."""


@dataclasses.dataclass(frozen=True)
class VideoInfo:
  """What the container says about the first video stream."""

  codec: str
  width: int
  height: int
  fps: float | None  # average frame rate, where the container gives one


def _exact(value: float) -> fractions.Fraction:
  return fractions.Fraction(value).limit_denominator(1_000_000)


def cover_crop(src_height: int, src_width: int, height: int, width: int) -> tuple[int, int, int, int]:
  """(scaled height, scaled width, top, left): the size that covers height x width at the source's aspect ratio,
  and the offset of the centred crop."""
  scale = max(height / src_height, width / src_width)
  sh, sw = max(height, round(src_height * scale)), max(width, round(src_width * scale))
  return sh, sw, (sh - height) // 2, (sw - width) // 2


class _Converter:
  """av.VideoFrame -> uint8 [height, width, 3] RGB, scaled to cover and centre-cropped."""

  def __init__(self, height: int, width: int):
    self.height, self.width = height, width
    self._plan: tuple[int, int, int, int, int, int] | None = None
    self._reformatter = av.video.reformatter.VideoReformatter()  # keeps its scaler: many times faster per frame

  def __call__(self, frame: av.VideoFrame) -> np.ndarray:
    if self._plan is None or self._plan[:2] != (frame.height, frame.width):
      self._plan = (frame.height, frame.width) + cover_crop(frame.height, frame.width, self.height, self.width)
    _, _, sh, sw, top, left = self._plan
    rgb = self._reformatter.reformat(frame, width=sw, height=sh, format="rgb24", interpolation="AREA").to_ndarray()
    return np.ascontiguousarray(rgb[top : top + self.height, left : left + self.width])


def _open(path: str | os.PathLike) -> av.container.InputContainer:
  if os.path.isfile(path) and os.path.getsize(path) == 0:
    raise Undecodable("empty file (0 bytes)")
  try:
    container = av.open(os.fspath(path), mode="r")
  except (av.FFmpegError, OSError, ValueError) as e:
    raise Undecodable(f"cannot open: {e}") from e
  if not container.streams.video:
    container.close()
    raise Undecodable("no video stream")
  return container


def probe(path: str | os.PathLike) -> VideoInfo:
  """The first video stream's codec, size and frame rate (raises Undecodable)."""
  with _open(path) as container:
    stream = container.streams.video[0]
    rate = stream.average_rate
    return VideoInfo(
        codec=stream.codec_context.name,
        width=stream.codec_context.width,
        height=stream.codec_context.height,
        fps=float(rate) if rate else None,
    )


def iter_frames(
    path: str | os.PathLike,
    fps: float,
    height: int,
    width: int,
    start_frame: int = 0,
    end_frame: int | None = None,
    threads: int = 1,
) -> Iterator[tuple[int, np.ndarray]]:
  """Yields (k, frame) for output frames start_frame <= k < end_frame (None: to the end) of the video at ``fps``,
  each uint8 [height, width, 3] RGB.

  A positive start_frame seeks to the keyframe before it first. ``threads`` > 1 lets FFmpeg decode with that many
  threads.

  Raises:
    Undecodable: the file cannot be opened, has no video stream, yields no frames, or fails to decode part way (the
      message gives the time).
  """
  rate = _exact(fps)
  convert = _Converter(height, width)
  with _open(path) as container:
    stream = container.streams.video[0]
    stream.thread_count = max(1, int(threads))
    base = stream.time_base
    origin = stream.start_time
    guessed = stream.average_rate or stream.guessed_rate or fractions.Fraction(25)
    if start_frame > 0 and origin is not None and base:
      seek_to = origin + int(fractions.Fraction(start_frame) / rate / base)
      try:
        container.seek(seek_to, stream=stream, backward=True, any_frame=False)
      except (av.FFmpegError, OSError) as e:
        raise Undecodable(f"cannot seek to frame {start_frame}: {e}") from e
    k, held, held_time, last_step, count = start_frame, None, None, 1 / guessed, 0
    frames = container.decode(stream)
    while True:
      try:
        frame = next(frames)
      except StopIteration:
        break
      except (av.FFmpegError, OSError, ValueError) as e:
        at = f" after {float(held_time):.2f} s" if held_time is not None else ""
        raise Undecodable(f"decoding failed{at}: {e}") from e
      if frame.pts is None or not base:
        t = fractions.Fraction(count) / guessed
      else:
        if origin is None:
          origin = frame.pts
        t = (frame.pts - origin) * base
      count += 1
      if held is not None:
        if t <= held_time:  # a repeated or out-of-order timestamp: keep the later frame
          held = frame
          continue
        last_step = t - held_time
        image = None
        while (end_frame is None or k < end_frame) and k / rate < t:
          image = convert(held) if image is None else image
          yield k, image
          k += 1
        if end_frame is not None and k >= end_frame:
          return
      held, held_time = frame, t
    if held is None:
      if count == 0 and start_frame == 0:
        raise Undecodable("no video frames decoded")
      return
    end_time = held_time + last_step
    image = None
    while (end_frame is None or k < end_frame) and k / rate < end_time:
      image = convert(held) if image is None else image
      yield k, image
      k += 1
