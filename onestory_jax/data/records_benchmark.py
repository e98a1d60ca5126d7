r"""Times the input pipeline of training records against the train step, beside StoryWorld's, end to end.

  python -m onestory_jax.data.records_benchmark [--workdir=DIR] [--stories=16] [--data_batches=200] [--steps=20]
      [--config=configs/onestory.py:demo] [--config.data.worker_count=N ...]

First it prepares training records for ``config.data.source='multishot'`` from nothing but this package, in
--workdir (default /tmp/onestory_records_benchmark). A rerun reuses what is there: finished videos, curation results
(:func:`curation.pipeline.curate` resumes) and a finished build (:func:`onestory_jax.data.build.build` finds it by
its fingerprint and does nothing).

1. ``--stories`` StoryWorld stories are rendered to h264 mp4 files at config.data's frame size
   (:func:`onestory_jax.data.curation.synthetic.make_video`: 3 or 4 shots of 1 to 2 s at 16 fps, hard cuts), with
   their captions as JSONL.
2. They are curated with the project's curation pipeline (``python -m onestory_jax.data.curate``, at 16 fps and
   config.data's frames per shot and frame size) into 2- and 3-shot story units.
3. The units are built into records by :func:`onestory_jax.data.build.build` at the run config (DirectRunner, in
   process).
   - The demo needs no converted Wan: its codec is space to depth, and its text encoder is trained, so records hold
     caption tokens only (:class:`layout.RecordLayout`). ``config.pretrained`` is an empty folder in --workdir.
   - The App. A.2 pseudo-labels need DINOv2 and CLIP. Tiny towers with RANDOM weights are made for them
     (transformers ``Dinov2Model`` / ``CLIPVisionModel``, ``save_pretrained``; this needs torch and transformers,
     the ``test`` extra, once). The labels are therefore meaningless. The reader's throughput does not change: a
     label is a stored array either way.
   - Only record-shaping settings decide the build (its fingerprint leaves out the training-only fields of
     config.data, :data:`encoder.TRAINING_ONLY_DATA`), so another ``--config.data.worker_count`` reuses the
     records. A change that shapes records (frame size, frames per shot, text length, codec, encoders) or another
     ``--stories`` replaces the build.

Then :func:`onestory_jax.benchmark.benchmark_train_step` runs twice, with the same config: on the records, and on
the config's StoryWorld source. It prints one JSON line. For each side (``multishot``, ``storyworld``) it gives the
compiled train step's median time, the input pipeline's batches per second alone (with ``config.data.worker_count``
worker processes; ``--data_batches`` after as many warm-up batches), and their ratio ``data_over_step``: how many
times faster the data comes than the step consumes it (issue 22's target: at least 3). It also gives the worker
count, the numbers of stories, story units and records, and the seconds that preparing and measuring took. Bad
flags end the run with one line naming the flag, and exit status 2.
"""

from __future__ import annotations

import json
import os
import time

from absl import flags
import ml_collections
from ml_collections import config_flags

from onestory_jax import benchmark
from onestory_jax import locks
from onestory_jax import logs
from onestory_jax.data import build as build_lib
from onestory_jax.data.curation import captions as captions_lib
from onestory_jax.data.curation import pipeline as curation
from onestory_jax.data.curation import synthetic
from onestory_jax.data.curation.config import CurationConfig

DEFAULT_WORKDIR = "/tmp/onestory_records_benchmark"
FPS = 16  # of the rendered videos and of curation (Wan's)
SHOTS = (3, 4)  # per video
SECONDS = (1.0, 2.0)  # per shot
PSEUDO_LABELS = "from randomly initialised tiny DINOv2 and CLIP (meaningless labels; the reader's speed is the same)"


def _videos(directory: str, stories: int, height: int, width: int) -> tuple[list[str], str]:
  """The rendered videos (made if missing, each written atomically) and their captions file."""
  os.makedirs(directory, exist_ok=True)
  paths, lines = [], []
  for i in range(stories):
    path = os.path.join(directory, f"story_{i:05d}.mp4")
    side = path[: -len(".mp4")] + ".captions.json"  # written last: the video is finished
    if not os.path.exists(side):
      partial = path[: -len(".mp4")] + ".partial.mp4"
      video = synthetic.make_video(
          partial, seed=10_000 + i, fps=FPS, num_shots=SHOTS, seconds=SECONDS, size=(height, width)
      )
      os.replace(partial, path)
      with open(side + ".tmp", "w") as f:
        json.dump(video.captions_line(os.path.basename(path)), f)
      os.replace(side + ".tmp", side)
    with open(side) as f:
      lines.append(f.read().strip())
    paths.append(os.path.abspath(path))
  captions = os.path.join(directory, f"captions_{stories}.jsonl")
  with open(captions + ".tmp", "w") as f:
    f.write("\n".join(lines) + "\n")
  os.replace(captions + ".tmp", captions)
  return paths, captions


def _towers(directory: str) -> tuple[str, str]:
  """Tiny random DINOv2 and CLIP vision towers as transformers folders (made once)."""
  dinov2, clip = os.path.join(directory, "dinov2"), os.path.join(directory, "clip")
  if not (os.path.exists(os.path.join(dinov2, "config.json")) and os.path.exists(os.path.join(clip, "config.json"))):
    try:
      import torch  # pylint: disable=g-import-not-at-top
      import transformers  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ValueError(
          f"--workdir={os.path.dirname(directory)}: making the random pseudo-label towers needs torch and "
          f"transformers (pip install -e '.[test]'): {e}"
      ) from None
    torch.manual_seed(0)
    sizes = dict(num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14, image_size=28)
    for path, model in (
        (dinov2, transformers.Dinov2Model(transformers.Dinov2Config(hidden_size=32, **sizes))),
        (clip, transformers.CLIPVisionModel(transformers.CLIPVisionConfig(hidden_size=32, hidden_act="gelu", **sizes))),
    ):
      model.save_pretrained(path + ".partial", safe_serialization=True)
      if os.path.exists(path):
        for name in os.listdir(path):
          os.remove(os.path.join(path, name))
        os.rmdir(path)
      os.replace(path + ".partial", path)
  return dinov2, clip


def prepare(workdir: str, stories: int, config: ml_collections.ConfigDict, progress: bool = False) -> dict:
  """Videos, curation and records of ``stories`` StoryWorld stories in ``workdir`` (reused when there); returns
  build's summary with ``seconds`` (this call's wall time) and ``rebuilt`` (whether the records were built now)."""
  start = time.perf_counter()
  d = config.data
  height, width, frames = int(d.height), int(d.width), int(d.frames_per_shot)
  with locks.exclusive(workdir, "--workdir"):
    videos, captions = _videos(os.path.join(workdir, "videos"), stories, height, width)
    curated = os.path.join(workdir, "curated")
    curation.curate(
        videos,
        curated,
        CurationConfig(fps=FPS, frames_per_shot=frames, height=height, width=width),
        captions_lib.JsonlCaptions(captions),
        progress=progress,
    )
    dinov2, clip = _towers(os.path.join(workdir, "towers"))
    pretrained = os.path.join(workdir, "pretrained")  # empty: the demo's codec and text encoder have no weights
    os.makedirs(pretrained, exist_ok=True)
    summary = build_lib.build(
        manifest=os.path.join(curated, "manifest.jsonl"),
        config=_with_pretrained(config, pretrained),
        out=os.path.join(workdir, "records"),
        name=str(config.get("variant", "records")),
        dinov2=dinov2,
        clip=clip,
        overwrite=True,  # other stories or a record-shaping change: a new build replaces the old one
        progress=progress,
    )
  return summary | {"seconds": time.perf_counter() - start, "rebuilt": not summary["already_built"]}


def _with_pretrained(config: ml_collections.ConfigDict, pretrained: str) -> ml_collections.ConfigDict:
  out = ml_collections.ConfigDict(config.to_dict())
  out.pretrained = pretrained
  return out


def _side(out: dict) -> dict:
  keys = ("step_time_s", "steps_per_s", "data_batches_per_s", "data_over_step")
  return {k: out[k] for k in keys}


def run(
    config: ml_collections.ConfigDict, workdir: str, stories: int, data_batches: int, steps: int, progress=False
) -> dict:
  """Prepares the records (:func:`prepare`) and times both sides (module docstring); returns the JSON dict."""
  if not workdir:
    raise ValueError("--workdir must name a directory")
  for name, value in (("stories", stories), ("data_batches", data_batches), ("steps", steps)):
    if value < (2 if name == "stories" else 1):
      raise ValueError(f"--{name} must be >= {2 if name == 'stories' else 1}, got {value}")
  if config.data.source == "multishot":
    raise ValueError(
        "--config.data.source=multishot: leave it at a StoryWorld source (on_the_fly or tfds); the command sets "
        "the records side itself"
    )
  built = prepare(os.path.abspath(workdir), stories, config, progress)
  if built["records"] < 2:
    raise ValueError(f"--stories={stories}: only {built['records']} record(s) were built; the reader needs 2")
  records = ml_collections.ConfigDict(config.to_dict())
  records.data.source = "multishot"
  records.data.records = built["dataset_dir"]
  start = time.perf_counter()
  multishot = benchmark.benchmark_train_step(records, steps, data_batches)
  storyworld = benchmark.benchmark_train_step(config, steps, data_batches)
  return {
      "config": multishot["config"],
      "devices": multishot["devices"],
      "global_batch": multishot["global_batch"],
      "data_worker_count": multishot["data_worker_count"],
      "data_batches": data_batches,
      "steps": steps,
      "stories": stories,
      "units": built["units"],
      "records": built["records"],
      "multishot": _side(multishot),
      "storyworld": _side(storyworld) | {"source": config.data.source},
      "rebuilt": built["rebuilt"],
      "prepare_s": round(built["seconds"], 2),
      "measure_s": round(time.perf_counter() - start, 2),
      "records_dir": built["dataset_dir"],
      "pseudo_labels": PSEUDO_LABELS,
  }


def main(argv):
  del argv  # logs.run: no positional arguments
  f = flags.FLAGS
  out = run(f.config, f.workdir or DEFAULT_WORKDIR, f.stories, f.data_batches, f.steps, f.progress)
  print(json.dumps(out), flush=True)


def define_flags() -> None:
  """The command's flags, defined only when it runs as a program (its module is imported beside others). benchmark
  and data.build define --config, --steps and --data_batches as well; these override them (allow_override)."""
  config_flags.DEFINE_config_file(
      "config", "configs/onestory.py:demo", "Configuration.", lock_config=True, allow_override=True
  )
  flags.DEFINE_string(
      "workdir", None, f"Videos, curation and records; a rerun reuses them (default {DEFAULT_WORKDIR})."
  )
  flags.DEFINE_integer("stories", 16, "StoryWorld stories rendered to videos (each gives one or two story units).")
  flags.DEFINE_integer("data_batches", 200, "Batches the input pipeline is timed over.", allow_override=True)
  flags.DEFINE_integer("steps", 20, "Timed train steps (after one warm-up step).", allow_override=True)
  # --progress / --noprogress: data.build's flag.


if __name__ == "__main__":
  define_flags()
  build_lib.quiet_beam_import()
  logs.run(main, bad_input=(locks.InUse, ValueError, OSError))
