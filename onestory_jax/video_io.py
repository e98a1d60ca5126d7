"""Video, image and file outputs: mp4, contact sheets, lossless npz frames, atomic writes.

Outputs people look at are mp4 files and PNG contact sheets (one row per shot, caption with
each row). h264 subsamples colour, so anything that is measured is also kept losslessly as
uint8 frames in an npz file (:func:`save_frames_npz`).

Every writer is atomic: it writes a temporary file in the destination's directory and then
``os.replace``-s it onto the destination, so readers never see a partial file and a failed
write leaves the destination as it was.

mp4 goes through imageio's ffmpeg plugin (imageio-ffmpeg bundles an ffmpeg binary; no system
ffmpeg is needed). h264 with yuv420p needs even frame sizes; small demo frames are upscaled
(nearest neighbour, ``scale``) so that players show them at a useful size, and an odd size is
padded by one edge row / column.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import warnings
import zipfile
from typing import Any, Iterator, Sequence

import imageio.v2 as imageio
import numpy as np
from PIL import Image, ImageDraw, ImageFont

PathLike = str | os.PathLike


# ---------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def _atomic_path(path: PathLike, suffix: str = "") -> Iterator[str]:
  """Yields a temporary path beside ``path``; on success it replaces ``path``.

  The temporary name ends with ``suffix`` (writers such as ffmpeg pick the format from it).

  On any exception the temporary file is removed and ``path`` is left untouched.
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp" + suffix, dir=directory)
  os.close(fd)
  try:
    yield tmp
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
  """Writes ``data`` to ``path`` atomically (temp file in the same directory + os.replace)."""
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise ValueError(f"atomic_write_bytes({os.fspath(path)}): data must be bytes, " f"got {type(data).__name__}")
  with _atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())


def read_json_object(path: PathLike) -> dict:
  """A JSON object from ``path``; ValueError naming the file if it is not valid JSON or not an object."""
  try:
    with open(path) as f:
      out = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(out, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(out).__name__}")
  return out


def atomic_write_json(path: PathLike, obj: Any) -> None:
  """Writes ``obj`` as indented, strict JSON (no NaN or Infinity; UTF-8, trailing newline) to ``path`` atomically."""
  try:
    text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
  except (TypeError, ValueError) as e:
    raise ValueError(f"atomic_write_json({os.fspath(path)}): object is not JSON-serialisable: " f"{e}") from e
  atomic_write_bytes(path, text.encode("utf-8"))


# ---------------------------------------------------------------------------- validation
def _check_frames(frames: Any, what: str) -> np.ndarray:
  """Checks a uint8 [T, H, W, 3] clip (T >= 1) and returns it as a numpy array."""
  frames = np.asarray(frames)
  if frames.dtype != np.uint8:
    raise ValueError(f"{what}: frames must be uint8, got dtype {frames.dtype}")
  if frames.ndim != 4 or frames.shape[-1] != 3 or min(frames.shape) < 1:
    raise ValueError(f"{what}: frames must be uint8 [T, H, W, 3] with T, H, W >= 1, got shape " f"{frames.shape}")
  return frames


def _check_scale(scale: Any, what: str) -> int:
  if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
    raise ValueError(f"{what}: scale must be a positive int, got {scale!r}")
  return int(scale)


def upscale(frames: np.ndarray, scale: int) -> np.ndarray:
  """Nearest-neighbour upscaling of the two axes before the last ([..., H, W, C])."""
  scale = _check_scale(scale, "upscale")
  if scale == 1:
    return frames
  return np.repeat(np.repeat(frames, scale, axis=-3), scale, axis=-2)


# ---------------------------------------------------------------------------- mp4
@contextlib.contextmanager
def _quiet_fork_warning() -> Iterator[None]:
  """Silences JAX's os.fork() warning for imageio's ffmpeg subprocess.

  The warning targets forks that keep running Python code; subprocess forks and immediately
  execs the ffmpeg binary, which is safe.
  """
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
    yield


def write_mp4(path: PathLike, frames: Any, fps: float = 8, scale: int = 1, quality: float = 9.0) -> None:
  """Writes uint8 frames [T, H, W, 3] as an h264 / yuv420p mp4, atomically.

  Args:
    path: destination (.mp4).
    frames: uint8 [T, H, W, 3].
    fps: frames per second.
    scale: nearest-neighbour upscaling factor (e.g. 8 for 32 px demo frames).
    quality: imageio quality in [1, 10); 9 maps to x264 crf 5 (visually lossless). 10 (crf 0)
      would switch x264 to its lossless High 4:4:4 profile, which many players cannot play,
      so it is refused.
  """
  where = f"write_mp4({os.fspath(path)})"
  frames = upscale(_check_frames(frames, where), _check_scale(scale, where))
  if not fps > 0:
    raise ValueError(f"{where}: fps must be positive, got {fps!r}")
  if not 1 <= quality < 10:
    raise ValueError(f"{where}: quality must be in [1, 10), got {quality!r}")
  _, h, w, _ = frames.shape
  if h % 2 or w % 2:  # yuv420p needs even sizes: repeat the last row / column.
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
  with _atomic_path(path, suffix=".mp4") as tmp, _quiet_fork_warning():
    writer = imageio.get_writer(
        tmp,
        format="FFMPEG",
        mode="I",
        fps=fps,
        codec="libx264",
        quality=quality,
        pixelformat="yuv420p",
        macro_block_size=1,
        ffmpeg_log_level="error",
    )
    try:
      for frame in frames:
        writer.append_data(frame)
    finally:
      writer.close()


def read_mp4(path: PathLike) -> np.ndarray:
  """Reads every frame of a video file as uint8 [T, H, W, 3]."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"read_mp4: no such file: {path}")
  try:
    with _quiet_fork_warning():
      reader = imageio.get_reader(path, format="FFMPEG")
      try:
        frames = [np.asarray(f)[..., :3] for f in reader]
      finally:
        reader.close()
  except (OSError, RuntimeError, IndexError) as e:
    raise ValueError(f"read_mp4: cannot decode {path}: {e}") from e
  if not frames:
    raise ValueError(f"read_mp4: {path} contains no frames")
  return np.stack(frames).astype(np.uint8)


# ---------------------------------------------------------------------------- images
def save_png(path: PathLike, image: Any) -> None:
  """Saves a uint8 [H, W, 3] image as PNG, atomically."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"save_png({os.fspath(path)}): image must be uint8 [H, W, 3], got " f"{image.dtype} {image.shape}")
  with _atomic_path(path, suffix=".png") as tmp:
    Image.fromarray(image).save(tmp, format="PNG")


_BACKGROUND = (24, 24, 24)
_TEXT = (235, 235, 235)
_GAP = 2  # pixels between frames and rows
_MARGIN = 4  # pixels around the caption text


def _sample_indices(num: int, max_frames: int) -> np.ndarray:
  """``max_frames`` evenly spaced indices in [0, num), first and last included."""
  if num <= max_frames:
    return np.arange(num)
  return np.round(np.linspace(0, num - 1, max_frames)).astype(np.int64)


def _wrap(draw: ImageDraw.ImageDraw, font: Any, text: str, width: int) -> list[str]:
  """Greedy word wrap of ``text`` to lines no wider than ``width`` pixels."""
  lines = []
  for paragraph in text.splitlines() or [""]:
    words = paragraph.split(" ")
    line = ""
    for word in words:
      candidate = f"{line} {word}" if line else word
      if line and draw.textlength(candidate, font=font) > width:
        lines.append(line)
        line = word
      else:
        line = candidate
    lines.append(line)
  # A single word wider than the row is hard-split by characters.
  out = []
  for line in lines:
    while line and draw.textlength(line, font=font) > width and len(line) > 1:
      n = max(1, int(len(line) * width / draw.textlength(line, font=font)))
      out.append(line[:n])
      line = line[n:]
    out.append(line)
  return out


def contact_sheet(
    shots: Sequence[Any], captions: Sequence[str] | None = None, scale: int = 4, max_frames: int = 8
) -> np.ndarray:
  """One row per shot, frames left to right, each row's caption above it.

  Args:
    shots: list of uint8 [T, H, W, 3] clips (sizes may differ between shots).
    captions: one caption per shot, or None for "shot i" labels only.
    scale: nearest-neighbour upscaling of each frame.
    max_frames: at most this many frames per row, evenly spaced (first and last kept).

  Returns:
    uint8 [H_sheet, W_sheet, 3].
  """
  if not isinstance(shots, (list, tuple)) or not shots:
    raise ValueError(
        f"contact_sheet: shots must be a non-empty list of uint8 [T, H, W, 3] clips, "
        f"got {type(shots).__name__} {shots!r:.60}"
    )
  if captions is not None and len(captions) != len(shots):
    raise ValueError(f"contact_sheet: got {len(captions)} captions for {len(shots)} shots")
  scale = _check_scale(scale, "contact_sheet")
  if isinstance(max_frames, bool) or not isinstance(max_frames, (int, np.integer)) or max_frames < 1:
    raise ValueError(f"contact_sheet: max_frames must be a positive int, got {max_frames!r}")
  rows = []
  for i, shot in enumerate(shots):
    clip = _check_frames(shot, f"contact_sheet: shots[{i}]")
    clip = upscale(clip[_sample_indices(len(clip), max_frames)], scale)
    n, h, w, _ = clip.shape
    row = np.empty((h, n * w + (n - 1) * _GAP, 3), np.uint8)
    row[:] = _BACKGROUND
    for j, frame in enumerate(clip):
      row[:, j * (w + _GAP) : j * (w + _GAP) + w] = frame
    rows.append(row)
  sheet_w = max(r.shape[1] for r in rows) + 2 * _GAP

  font = ImageFont.load_default()
  scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  left, top, right, bottom = scratch.textbbox((0, 0), "Ag", font=font)
  line_h = bottom - top + 2
  labels = []
  for i in range(len(shots)):
    text = f"shot {i + 1}" + (f": {captions[i]}" if captions is not None else "")
    labels.append(_wrap(scratch, font, text, sheet_w - 2 * _MARGIN))
  del left, right

  heights = [2 * _MARGIN + line_h * len(lab) + r.shape[0] + _GAP for lab, r in zip(labels, rows)]
  sheet = Image.new("RGB", (sheet_w, sum(heights) + _GAP), _BACKGROUND)
  draw = ImageDraw.Draw(sheet)
  y = _GAP
  for lab, row in zip(labels, rows):
    for k, line in enumerate(lab):
      draw.text((_MARGIN, y + _MARGIN + k * line_h - top), line, fill=_TEXT, font=font)
    y += 2 * _MARGIN + line_h * len(lab)
    sheet.paste(Image.fromarray(row), (_GAP, y))
    y += row.shape[0] + _GAP
  return np.asarray(sheet, dtype=np.uint8)


# ---------------------------------------------------------------------------- npz frames
_KEY = re.compile(r"shot_(0|[1-9][0-9]*)")


def save_frames_npz(path: PathLike, shots: Sequence[Any]) -> None:
  """Saves shots (uint8 [T, H, W, 3] each) losslessly as keys shot_0, shot_1, ..., atomically."""
  where = f"save_frames_npz({os.fspath(path)})"
  if not isinstance(shots, (list, tuple)) or not shots:
    raise ValueError(f"{where}: shots must be a non-empty list of uint8 [T, H, W, 3] clips")
  arrays = {f"shot_{i}": _check_frames(s, f"{where}: shots[{i}]") for i, s in enumerate(shots)}
  with _atomic_path(path, suffix=".npz") as tmp:
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
      f.flush()
      os.fsync(f.fileno())


def load_frames_npz(path: PathLike) -> list[np.ndarray]:
  """Loads the shots written by :func:`save_frames_npz`, validating keys, dtypes and shapes."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"load_frames_npz: no such file: {path}")
  if not zipfile.is_zipfile(path):
    raise ValueError(f"{path}: not a readable npz file (not a zip archive)")
  try:
    with np.load(path, allow_pickle=False) as data:
      arrays = {k: data[k] for k in data.files}
  except ValueError as e:
    raise ValueError(f"{path}: cannot load npz without pickles: {e}") from e
  except Exception as e:  # zipfile.BadZipFile, OSError, EOFError, ...
    raise ValueError(f"{path}: not a readable npz file ({type(e).__name__}: {e})") from e
  bad = sorted(k for k in arrays if not _KEY.fullmatch(k))
  if bad:
    raise ValueError(f"{path}: unexpected key(s) {bad}; expected shot_0, shot_1, ...")
  if not arrays:
    raise ValueError(f"{path}: contains no shots; expected keys shot_0, shot_1, ...")
  indices = sorted(int(k[len("shot_") :]) for k in arrays)
  if indices != list(range(len(indices))):
    missing = sorted(set(range(max(indices) + 1)) - set(indices))
    raise ValueError(
        f"{path}: shot keys must be contiguous from shot_0; missing " f"{['shot_%d' % m for m in missing]}"
    )
  shots = []
  for i in indices:
    key = f"shot_{i}"
    a = arrays[key]
    if a.dtype != np.uint8:
      raise ValueError(f"{path}: {key} must be uint8, got dtype {a.dtype}")
    if a.ndim != 4 or a.shape[-1] != 3 or min(a.shape) < 1:
      raise ValueError(f"{path}: {key} must be [T, H, W, 3] with T, H, W >= 1, got shape {a.shape}")
    shots.append(a)
  return shots


__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "contact_sheet",
    "load_frames_npz",
    "read_mp4",
    "save_frames_npz",
    "save_png",
    "upscale",
    "write_mp4",
]
