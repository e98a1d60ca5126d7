r"""Times curation: videos/s and shots/s per core on StoryWorld videos with known cuts.

  python -m onestory_jax.data.curate_benchmark [--num_videos=8] [--source_height=360 --source_width=640] \
      [--source_fps=30] [--curate_workers=1]

Writes ``--num_videos`` synthetic videos (onestory_jax/data/curation/synthetic.py: 3 to 6 shots of 2 to 6 s, rendered at a
quarter of the size and upscaled, h264)
and their captions to a temporary folder, curates them with the default CurationConfig (16 fps, 480x832, analysis
at 128 px) except a 1 s shortest shot, and prints JSON: wall time, videos/s, shots/s, source frames/s, seconds of
video per second, each also per core (divided by --curate_workers; each worker decodes with one thread), and the cut
precision and recall. Writing the videos is not timed.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from absl import flags
import numpy as np

from onestory_jax import logs
from onestory_jax.data.curation import captions
from onestory_jax.data.curation import pipeline
from onestory_jax.data.curation import synthetic
from onestory_jax.data.curation.config import CurationConfig

_NUM = flags.DEFINE_integer("num_videos", 8, "Videos to curate.")
_HEIGHT = flags.DEFINE_integer("source_height", 360, "Source video height (rendered at a quarter, upscaled).")
_WIDTH = flags.DEFINE_integer("source_width", 640, "Source video width (rendered at a quarter, upscaled).")
_SOURCE_FPS = flags.DEFINE_float("source_fps", 30.0, "Source frame rate.")
_WORKERS = flags.DEFINE_integer(
    "curate_workers", 1, "Curation processes (python -m onestory_jax.data.curate --workers)."
)


def cut_scores(records: list[dict], truth: list[synthetic.SyntheticVideo], fps: float) -> dict:
  """Precision and recall of the detected cuts against the true ones (a detection within one frame counts)."""
  hits = detected = expected = 0
  for record, video in zip(records, truth):
    found = [s["start_frame"] for s in record["shots"][1:]] if record["shots"] else []
    true = [int(np.ceil(c / video.fps * fps - 1e-9)) for c in video.cuts]
    hits += sum(any(abs(f - t) <= 1 for f in found) for t in true)
    detected, expected = detected + len(found), expected + len(true)
  return {
      "cuts": expected,
      "detected": detected,
      "precision": hits / detected if detected else 1.0,
      "recall": hits / expected if expected else 1.0,
  }


def run(num_videos: int, height: int, width: int, source_fps: float, workers: int = 1) -> dict:
  config = CurationConfig(min_shot_seconds=1.0)
  with tempfile.TemporaryDirectory() as tmp:
    truth = []
    for i in range(num_videos):
      path = os.path.join(tmp, f"video_{i:03d}.mp4")
      truth.append(
          synthetic.make_video(
              path, seed=1000 + i, fps=source_fps, seconds=(2.0, 6.0), size=(height // 4, width // 4), scale=4
          )
      )
    with open(os.path.join(tmp, "captions.jsonl"), "w") as f:
      f.writelines(json.dumps(v.captions_line()) + "\n" for v in truth)
    videos = pipeline.find_videos([os.path.join(tmp, "*.mp4")])
    captioner = captions.JsonlCaptions(os.path.join(tmp, "captions.jsonl"))
    start = time.perf_counter()
    summary = pipeline.curate(videos, os.path.join(tmp, "out"), config, captioner, workers, progress=False)
    seconds = time.perf_counter() - start
    records = [json.load(open(os.path.join(tmp, "out", "videos", pipeline.video_key(v) + ".json"))) for v in videos]
  frames = sum(sum(v.lengths) for v in truth)
  video_s = frames / source_fps
  rates = {
      "videos_per_s": num_videos / seconds,
      "shots_per_s": summary["shots_detected"] / seconds,
      "source_frames_per_s": frames / seconds,
      "video_seconds_per_s": video_s / seconds,
  }
  return {
      "videos": num_videos,
      "source": f"{width // 4 * 4}x{height // 4 * 4} h264 at {source_fps:g} fps",
      "video_seconds": round(video_s, 2),
      "shots": summary["shots_detected"],
      "units": summary["units"],
      "workers": workers,
      "wall_s": round(seconds, 3),
      **{k: round(v, 3) for k, v in rates.items()},
      **{k.replace("_per_s", "_per_s_per_core"): round(v / workers, 3) for k, v in rates.items()},
      **cut_scores(records, truth, config.fps),
  }


def main(argv):
  del argv  # logs.run: no positional arguments
  print(json.dumps(run(_NUM.value, _HEIGHT.value, _WIDTH.value, _SOURCE_FPS.value, _WORKERS.value), indent=2))


if __name__ == "__main__":
  logs.run(main)
