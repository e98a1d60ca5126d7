"""python -m onestory_jax.data.records_benchmark at tiny sizes: StoryWorld videos are rendered, curated and built
into records (random pseudo-label towers), then the train step and both input pipelines are timed; a second run
reuses the build; bad flags end with one line and exit status 2."""

import os
import subprocess
import sys

import pytest

from onestory_jax.data import records_benchmark
from tests.helpers import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 8 simulated devices (conftest.py): the tiny config's global batch of 8 is one sample per device.
OVERRIDES = {"model.num_layers": 1, "data.batch_size": 8}


def _files(directory):
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      st = os.stat(os.path.join(root, name))
      out[os.path.relpath(os.path.join(root, name), directory)] = (st.st_size, st.st_mtime_ns, st.st_ino)
  return out


@pytest.fixture(scope="module")
def first(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("records_benchmark"))
  out = records_benchmark.run(load_config("tiny", **OVERRIDES), workdir, stories=3, data_batches=3, steps=2)
  return workdir, out


def test_prints_both_sides_and_their_ratio(first):
  _, out = first
  print(f"\nrecords benchmark (tiny, under test load): {out}")
  assert out["config"] == "tiny" and out["stories"] == 3 and out["data_worker_count"] == 0
  assert out["global_batch"] == 8 and out["data_batches"] == 3 and out["steps"] == 2
  assert 2 <= out["records"] <= out["units"] and out["rebuilt"] and out["prepare_s"] > 0
  assert "random" in out["pseudo_labels"] and os.path.isdir(out["records_dir"])
  for side in ("multishot", "storyworld"):
    s = out[side]
    assert s["step_time_s"] > 0 and s["data_batches_per_s"] > 0
    assert s["steps_per_s"] == pytest.approx(1 / s["step_time_s"])
    assert s["data_over_step"] == pytest.approx(s["data_batches_per_s"] * s["step_time_s"])
  assert out["storyworld"]["source"] == "on_the_fly"


def test_a_second_run_reuses_the_videos_curation_and_records(first):
  """Another worker count and batch size (training-only knobs) build nothing again."""
  workdir, out = first
  before = _files(workdir)
  config = load_config("tiny", **{**OVERRIDES, "data.worker_count": 1, "data.batch_size": 16})
  again = records_benchmark.prepare(workdir, 3, config)
  assert not again["rebuilt"] and again["already_built"] and again["records"] == out["records"]
  assert again["dataset_dir"] == out["records_dir"]
  after = _files(workdir)
  # The records, the towers, the videos and the per-video curation results are the same files, untouched
  # (size, mtime, inode); curation only rewrites its manifest and summary, with the same content.
  kept = [k for k in before if k.startswith(("records/", "towers/", "curated/videos/")) or k.endswith(".mp4")]
  assert any(k.startswith("records/") for k in kept) and any(k.endswith(".mp4") for k in kept)
  assert {k: after.get(k) for k in kept} == {k: before[k] for k in kept}
  assert not [k for k in after if k not in before], sorted(set(after) - set(before))


def test_bad_input_is_one_line_and_status_2(tmp_path):
  with pytest.raises(ValueError, match="--config.data.source=multishot"):
    records_benchmark.run(
        load_config("tiny", **{"data.source": "multishot"}), str(tmp_path), stories=2, data_batches=1, steps=1
    )
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run(
      [sys.executable, "-m", "onestory_jax.data.records_benchmark", "--stories=1", f"--workdir={tmp_path}"],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  lines = [l for l in done.stderr.splitlines() if l.strip()]
  assert done.returncode == 2 and lines == ["--stories must be >= 2, got 1"], done.stderr[-2000:]
  assert not os.listdir(tmp_path)  # nothing prepared
