"""Tests for onestory_jax/video_io.py: mp4, contact sheets, npz frames, atomic writes."""

import json
import os

import numpy as np
from PIL import Image
import pytest

from onestory_jax import video_io


def _clip(t=4, h=16, w=16, seed=0):
  """A clip of flat colour blocks (h264-friendly), different in every frame."""
  rng = np.random.default_rng(seed)
  blocks = rng.integers(0, 256, (t, h // 8, w // 8, 3), dtype=np.uint8)
  return np.repeat(np.repeat(blocks, 8, axis=1), 8, axis=2)


def _files(directory):
  return sorted(os.listdir(directory))


# ------------------------------------------------------------------ mp4
def test_mp4_round_trip_with_upscale(tmp_path):
  clip = _clip(t=5)
  path = tmp_path / "out" / "shot.mp4"  # parent directory is created
  video_io.write_mp4(path, clip, fps=8, scale=4)
  frames = video_io.read_mp4(path)
  assert frames.shape == (5, 64, 64, 3) and frames.dtype == np.uint8
  # Sample the centre of each upscaled pixel; h264 at crf 5 is close to the input.
  centres = frames[:, 2::4, 2::4].astype(np.int32)
  assert np.abs(centres - clip).mean() < 3.0
  assert np.abs(centres - clip).max() < 40
  assert _files(tmp_path / "out") == ["shot.mp4"]  # no temporary files left behind


def test_mp4_odd_size_is_padded_to_even(tmp_path):
  clip = np.full((2, 5, 7, 3), 128, np.uint8)
  video_io.write_mp4(tmp_path / "odd.mp4", clip)
  assert video_io.read_mp4(tmp_path / "odd.mp4").shape == (2, 6, 8, 3)


def test_mp4_errors(tmp_path):
  with pytest.raises(ValueError, match=r"frames must be uint8, got dtype float32"):
    video_io.write_mp4(tmp_path / "a.mp4", np.zeros((2, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match=r"frames must be uint8 \[T, H, W, 3\].*\(8, 8, 3\)"):
    video_io.write_mp4(tmp_path / "a.mp4", np.zeros((8, 8, 3), np.uint8))
  with pytest.raises(ValueError, match=r"scale must be a positive int, got 0"):
    video_io.write_mp4(tmp_path / "a.mp4", _clip(), scale=0)
  with pytest.raises(ValueError, match=r"quality must be in \[1, 10\)"):
    video_io.write_mp4(tmp_path / "a.mp4", _clip(), quality=10)
  assert _files(tmp_path) == []
  with pytest.raises(FileNotFoundError, match=r"read_mp4: no such file: .*missing.mp4"):
    video_io.read_mp4(tmp_path / "missing.mp4")
  (tmp_path / "bad.mp4").write_bytes(b"not a video")
  with pytest.raises(ValueError, match=r"read_mp4: cannot decode .*bad.mp4"):
    video_io.read_mp4(tmp_path / "bad.mp4")


# ------------------------------------------------------------------ contact sheet / png
def test_contact_sheet_layout(tmp_path):
  shots = [_clip(t=10, seed=1), _clip(t=3, seed=2), _clip(t=2, h=8, w=24, seed=3)]
  captions = ["a fox walks through a long and winding forest path at dawn " * 3, "b", "c"]
  sheet = video_io.contact_sheet(shots, captions, scale=2, max_frames=4)
  assert sheet.dtype == np.uint8 and sheet.ndim == 3 and sheet.shape[-1] == 3
  # Widest row: 4 frames of 32 px + 3 gaps of 2 px, plus a 2 px border on each side.
  assert sheet.shape[1] == 4 * 32 + 3 * 2 + 2 * 2
  frame_rows = 32 + 32 + 16
  assert sheet.shape[0] > frame_rows + 3 * 10  # a caption band per row
  # The first frame of shot 1 appears, upscaled, somewhere in the sheet.
  target = np.repeat(np.repeat(shots[0][0], 2, 0), 2, 1)
  found = any(np.array_equal(sheet[y : y + 32, 2:34], target) for y in range(sheet.shape[0] - 31))
  assert found
  # The long caption wraps onto more lines than the short one: the sheet grows with it.
  short = video_io.contact_sheet(shots, ["a", "b", "c"], scale=2, max_frames=4)
  assert sheet.shape[0] > short.shape[0] and sheet.shape[1] == short.shape[1]
  # Text is drawn: the caption band holds light pixels.
  assert (sheet[:14] > 200).any()
  plain = video_io.contact_sheet([shots[1]], None, scale=1)
  assert plain.shape[1] == 3 * 16 + 2 * 2 + 2 * 2

  path = tmp_path / "sheet.png"
  video_io.save_png(path, sheet)
  np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), sheet)
  assert _files(tmp_path) == ["sheet.png"]


def test_contact_sheet_errors():
  with pytest.raises(ValueError, match=r"got 1 captions for 2 shots"):
    video_io.contact_sheet([_clip(), _clip()], ["only one"])
  with pytest.raises(ValueError, match=r"shots must be a non-empty list"):
    video_io.contact_sheet([])
  with pytest.raises(ValueError, match=r"shots\[1\]: frames must be uint8"):
    video_io.contact_sheet([_clip(), np.zeros((2, 8, 8, 3), np.float32)])
  with pytest.raises(ValueError, match=r"max_frames must be a positive int"):
    video_io.contact_sheet([_clip()], max_frames=0)
  with pytest.raises(ValueError, match=r"image must be uint8 \[H, W, 3\]"):
    video_io.save_png("/tmp/never_written.png", np.zeros((4, 4), np.uint8))


# ------------------------------------------------------------------ npz frames
def test_npz_round_trip_is_lossless(tmp_path):
  shots = [_clip(t=3, seed=4), np.arange(2 * 4 * 6 * 3, dtype=np.uint8).reshape(2, 4, 6, 3)]
  path = tmp_path / "frames.npz"
  video_io.save_frames_npz(path, shots)
  loaded = video_io.load_frames_npz(path)
  assert len(loaded) == 2
  for a, b in zip(loaded, shots):
    assert a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
  with np.load(path) as data:
    assert sorted(data.files) == ["shot_0", "shot_1"]
  assert _files(tmp_path) == ["frames.npz"]


def test_npz_atomic_on_failure(tmp_path, monkeypatch):
  path = tmp_path / "frames.npz"
  video_io.save_frames_npz(path, [_clip(seed=5)])
  before = path.read_bytes()
  # Validation failure: nothing written, old file intact.
  with pytest.raises(ValueError, match=r"shots\[1\]: frames must be uint8"):
    video_io.save_frames_npz(path, [_clip(), np.zeros((2, 8, 8, 3), np.int16)])
  # Failure half-way through writing: the temporary file is removed, old file intact.
  real_savez = np.savez

  def failing_savez(f, **arrays):
    f.write(b"PK partial garbage")
    raise OSError("disk full")

  monkeypatch.setattr(np, "savez", failing_savez)
  with pytest.raises(OSError, match="disk full"):
    video_io.save_frames_npz(path, [_clip(seed=6)])
  monkeypatch.setattr(np, "savez", real_savez)
  assert _files(tmp_path) == ["frames.npz"]
  assert path.read_bytes() == before
  # Same for a fresh destination: no partial file appears.
  monkeypatch.setattr(np, "savez", failing_savez)
  with pytest.raises(OSError):
    video_io.save_frames_npz(tmp_path / "new.npz", [_clip()])
  assert _files(tmp_path) == ["frames.npz"]


def test_npz_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no such file: .*nope.npz"):
    video_io.load_frames_npz(tmp_path / "nope.npz")
  bad = tmp_path / "bad.npz"
  bad.write_bytes(b"garbage")
  with pytest.raises(ValueError, match=r"bad.npz: not a readable npz file"):
    video_io.load_frames_npz(bad)
  cases = {
      "keys.npz": ({"shot_0": _clip(), "extra": _clip()}, r"keys.npz: unexpected key\(s\) \['extra'\]"),
      "gap.npz": ({"shot_0": _clip(), "shot_2": _clip()}, r"gap.npz: .*missing \['shot_1'\]"),
      "dtype.npz": ({"shot_0": _clip().astype(np.float32)}, r"dtype.npz: shot_0 must be uint8, got dtype float32"),
      "shape.npz": ({"shot_0": _clip()[0]}, r"shape.npz: shot_0 must be \[T, H, W, 3\].*\(16, 16, 3\)"),
      "empty.npz": ({}, r"empty.npz: contains no shots"),
  }
  for name, (arrays, message) in cases.items():
    np.savez(tmp_path / name, **arrays)
    with pytest.raises(ValueError, match=message):
      video_io.load_frames_npz(tmp_path / name)
  np.savez(tmp_path / "pickled.npz", shot_0=np.array([{"a": 1}], dtype=object))
  with pytest.raises(ValueError, match=r"pickled.npz: cannot load npz without pickles"):
    video_io.load_frames_npz(tmp_path / "pickled.npz")


# ------------------------------------------------------------------ atomic json / bytes
def test_atomic_json_and_bytes(tmp_path):
  path = tmp_path / "sub" / "meta.json"
  video_io.atomic_write_json(path, {"shots": 3, "caption": "café"})
  assert json.loads(path.read_text("utf-8")) == {"shots": 3, "caption": "café"}
  assert path.read_text("utf-8").endswith("\n")
  video_io.atomic_write_json(path, [1, 2])
  assert json.loads(path.read_text()) == [1, 2]
  with pytest.raises(ValueError, match=r"meta.json\): object is not JSON-serialisable"):
    video_io.atomic_write_json(path, {"x": object()})
  assert json.loads(path.read_text()) == [1, 2]
  video_io.atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
  assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
  with pytest.raises(ValueError, match=r"data must be bytes, got str"):
    video_io.atomic_write_bytes(tmp_path / "c.bin", "text")
  assert _files(tmp_path) == ["b.bin", "sub"] and _files(tmp_path / "sub") == ["meta.json"]
