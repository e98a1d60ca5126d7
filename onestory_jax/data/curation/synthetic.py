"""Videos with known cuts for the curation tests and benchmark: StoryWorld stories rendered to video files.

Each video is a sequence of shots of mixed lengths joined by hard cuts. A shot is one of

* ``story``: a StoryWorld shot (its characters moving across 80% of the frame in its environment), with its
  StoryWorld caption;
* ``black``: black frames;
* ``static``: one frame of a fresh StoryWorld shot, held (a still image);
* ``duplicate``: the previous shot again (a replay, as long as the original in :func:`make_video`) under a lighting
  change (the exposure drops): a cut for the detector, the same picture for the duplicate filter.

Files are written with PyAV (libx264 in mp4 by default; any PyAV codec and container).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import av
import numpy as np

from onestory_jax import video_io
from onestory_jax.data import storyworld

KINDS = ("story", "black", "static", "duplicate")


@dataclasses.dataclass(frozen=True)
class SyntheticVideo:
  """A written video and its ground truth.

  Attributes:
    path: the file.
    fps: its frame rate.
    kinds: per shot, one of KINDS.
    lengths: per shot, its frames.
    captions: per shot, its caption (the StoryWorld caption of the shot it shows; black shots have "").
  """

  path: str
  fps: float
  kinds: tuple[str, ...]
  lengths: tuple[int, ...]
  captions: tuple[str, ...]

  @property
  def cuts(self) -> list[int]:
    """The first frame of every shot but the first."""
    return [int(c) for c in np.cumsum(self.lengths)[:-1]]

  @property
  def spans(self) -> list[tuple[float, float]]:
    """Each shot's (start, end) in seconds."""
    edges = np.concatenate([[0], np.cumsum(self.lengths)]) / self.fps
    return [(float(a), float(b)) for a, b in zip(edges[:-1], edges[1:])]

  def captions_line(self, name: str | None = None) -> dict:
    """This video's line of a captions JSONL file (docs/curation.md), black shots left out."""
    shots = [
        {"start": round(s, 4), "end": round(e, 4), "caption": c} for (s, e), c in zip(self.spans, self.captions) if c
    ]
    return {"video": name or os.path.basename(self.path), "shots": shots}


def _regraded(frames: np.ndarray) -> np.ndarray:
  """A lighting change: the exposure drops to 45%."""
  return np.round(frames.astype(np.float32) * 0.45).astype(np.uint8)


def render(
    seed: int, kinds: Sequence[str], lengths: Sequence[int], size: int | tuple[int, int] = 64
) -> tuple[np.ndarray, list[str]]:
  """Frames uint8 [sum(lengths), height, width, 3] and per-shot captions of a video with these shots; ``size`` is
  the side of a square frame or (height, width)."""
  if len(kinds) != len(lengths) or not kinds:
    raise ValueError(f"need one length per shot kind, got kinds={kinds} lengths={lengths}")
  unknown = [k for k in kinds if k not in KINDS]
  if unknown or kinds[0] == "duplicate":
    raise ValueError(f"kinds must be in {KINDS} and not start with 'duplicate', got {list(kinds)}")
  n = sum(k in ("story", "static") for k in kinds)
  height, width = (size, size) if isinstance(size, int) else size
  cfg = storyworld.StoryWorldConfig(height=height, width=width, min_shots=2, max_shots=max(3, n))
  story = storyworld.generate_story(seed, "consistency", cfg, num_shots=max(2, n))

  def shot(index: int, frames: int) -> np.ndarray:
    # StoryWorld's speeds are for its 8-frame shots; slowed down, the characters cross 80% of the frame in the shot
    along = width if story["shots"][index]["action"] in ("left", "right") else height
    speed = 0.8 * along / (min(height, width) / 32 * max(frames - 1, 1))
    shots = [dict(s, start=None, speed=min(s["speed"], speed)) for s in story["shots"]]
    return storyworld.render_shot(dict(story, frames_per_shot=int(frames), shots=shots), index)

  out, captions, source = [], [], 0
  for i, (kind, length) in enumerate(zip(kinds, lengths)):
    if kind == "black":
      out.append(np.zeros((length, height, width, 3), np.uint8))
      captions.append("")
      continue
    if kind == "duplicate":  # the previous shot again, darker
      out.append(_regraded(out[-1][np.arange(length) % len(out[-1])]))
      captions.append(captions[-1])
      continue
    frames = shot(source, length if kind == "story" else 1)
    out.append(frames if kind == "story" else np.repeat(frames, length, axis=0))
    captions.append(story["shots"][source]["caption"])
    source += 1
  return np.concatenate(out), captions


def write_video(
    path: str, frames: np.ndarray, fps: float, codec: str = "libx264", options: dict[str, str] | None = None
) -> None:
  """Writes uint8 [T, H, W, 3] frames with PyAV (yuv420p)."""
  options = {"crf": "18", "preset": "veryfast"} if options is None and codec == "libx264" else (options or {})
  with av.open(path, mode="w") as container:
    stream = container.add_stream(codec, rate=round(fps) if float(fps).is_integer() else fps, options=options)
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = "yuv420p"
    for image in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def make_video(
    path: str,
    seed: int,
    fps: float = 16,
    kinds: Sequence[str] | None = None,
    num_shots: tuple[int, int] = (3, 6),
    seconds: tuple[float, float] = (1.5, 4.0),
    size: int | tuple[int, int] = 64,
    codec: str = "libx264",
    scale: int = 1,
) -> SyntheticVideo:
  """Renders and writes a video; shot lengths are drawn from ``seconds`` with the seed, and so is the shot count
  (from ``num_shots``) when ``kinds`` is None (then every shot is a story shot). ``scale`` > 1 upscales the rendered
  frames (nearest neighbour), which is faster than rendering large frames."""
  rng = np.random.default_rng([seed, 7])
  if kinds is None:
    kinds = ["story"] * int(rng.integers(num_shots[0], num_shots[1] + 1))
  lengths = [max(2, int(round(rng.uniform(*seconds) * fps))) for _ in kinds]
  for i, kind in enumerate(kinds):
    if kind == "duplicate":
      lengths[i] = lengths[i - 1]
  frames, captions = render(seed, kinds, lengths, size)
  write_video(path, video_io.upscale(frames, scale), fps, codec)
  return SyntheticVideo(path, float(fps), tuple(kinds), tuple(lengths), tuple(captions))


def write_corrupt_files(directory: str, valid_mp4: str) -> dict[str, str]:
  """Writes broken inputs beside good ones: a truncated copy of ``valid_mp4``, a text file named .mp4 and an empty
  .mp4. Returns {path: the reason curation must give}."""
  with open(valid_mp4, "rb") as f:
    data = f.read()
  files = {
      os.path.join(directory, "truncated.mp4"): data[: len(data) // 2],
      os.path.join(directory, "text.mp4"): b"this is not a video, just text with an .mp4 name\n" * 20,
      os.path.join(directory, "empty.mp4"): b"",
  }
  for path, content in files.items():
    with open(path, "wb") as f:
      f.write(content)
  return {path: "undecodable" for path in files}
