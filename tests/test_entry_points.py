"""Every command line, met with bad input: one line on stderr naming the flag, file or field, and exit status 2; no
start-up noise from libraries, no traceback (``--verbose`` adds it)."""

import os
import subprocess
import sys

import pytest

from tests.helpers import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MISSING = "/nonexistent/onestory"

# (module, arguments, what the one line must contain)
CASES = [
    ("onestory_jax.train", ["--config=configs/onestory.py:nope", "--workdir=W"], "unknown variant 'nope'"),
    (
        "onestory_jax.train",
        ["--config=configs/onestory.py:tiny", "--workdir=W", "--config.mesh.shape=(3,-1,1,1)"],
        "config.mesh.shape=(3, -1, 1, 1) does not divide 1 devices",
    ),
    ("onestory_jax.sample", [f"--story={MISSING}.json", "--out=OUT"], f"{MISSING}.json: story file not found"),
    ("onestory_jax.sample", ["--out=OUT", "--regenerate=1"], "no story there"),
    ("onestory_jax.sample", ["--out=OUT", "--steps=0", "--resume"], "--steps must be an integer >= 1"),
    ("onestory_jax.evaluate", [f"--story={MISSING}.json", "--samples=OUT"], "story file not found"),
    ("onestory_jax.memory_ablation", [f"--workdir={MISSING}"], f"--workdir={MISSING}: no checkpoints directory"),
    ("onestory_jax.memory_ablation", ["--memory_guidance=1,x"], "--memory_guidance: expected numbers separated by"),
    ("onestory_jax.memory_ablation", ["--memory_guidance=-1"], "--memory_guidance must be a finite number >= 0"),
    ("onestory_jax.sample", ["--out=OUT", "--resume", "--memory_guidance=-2"], "--memory_guidance must be a finite"),
    ("onestory_jax.studio", ["--memory_guidance=nan"], "--memory_guidance must be a finite number >= 0"),
    ("onestory_jax.plan", ["--config=configs/onestory.py:tiny", "--topology=v9:2x2"], "--topology='v9:2x2'"),
    ("onestory_jax.benchmark", ["--config=configs/onestory.py:tiny", "--config.model.attention=nope"], "nope"),
    ("onestory_jax.checkpoints", ["export", f"--workdir={MISSING}", "--out=OUT"], "no checkpoints directory"),
    ("onestory_jax.checkpoints", ["import", f"--workdir={MISSING}", "--out=OUT"], "expected the command 'export'"),
    ("onestory_jax.data.storyworld", ["export", "--seed=1"], "export needs --out=DIR"),
    ("onestory_jax.data.storyworld_tfds", ["--data_dir=OUT", "--config=nope"], "BuilderConfig nope not found"),
    ("onestory_jax.sampling_benchmark", [f"--workdir={MISSING}", "--shots=1"], "no checkpoints directory"),
    ("onestory_jax.convert", [f"--src={MISSING}", "--dst=OUT"], f"--src={MISSING}: not a directory"),
    ("onestory_jax.ablation", ["--table=2a"], "--table and --root are required"),
    ("onestory_jax.story", [f"--story={MISSING}.json", "--out=OUT"], "story file not found"),
    ("onestory_jax.data.curate", [f"--videos={MISSING}/*.mp4", "--out=OUT"], "no files match"),
    ("onestory_jax.data.build_cost", ["--units=2x5"], "--units: expected SHOTS:UNITS pairs"),
    ("onestory_jax.data.build_cost", ["--mfu=1.5", "--units=2:1"], "--mfu: expected a fraction"),
    ("onestory_jax.studio", ["--steps=0"], "--steps"),
    ("onestory_jax.sample", ["--out=OUT", "--bogus=1"], "Unknown command line flag 'bogus'"),
    ("onestory_jax.sample", ["--out=OUT", "extra"], "unexpected arguments ['extra']"),
    ("onestory_jax.evaluate", ["--story"], "flag --story"),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  """All the cases at once, as concurrent processes (each spends most of its time importing)."""
  procs = []
  for i, (module, args, _) in enumerate(CASES):
    tmp = tmp_path_factory.mktemp(f"case{i}")
    args = [a.replace("=OUT", f"={tmp / 'out'}").replace("=W", f"={tmp / 'w'}") for a in args]
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR="", XLA_FLAGS=xla_flags())  # one device
    procs.append(
        subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    )
  return [p.communicate(timeout=600) + (p.returncode,) for p in procs]


@pytest.mark.parametrize(
    "case", range(len(CASES)), ids=[f"{m.split('.')[-1]}-{i}" for i, (m, _, _) in enumerate(CASES)]
)
def test_bad_input_is_one_line_and_exit_status_2(results, case):
  module, args, expected = CASES[case]
  stdout, stderr, status = results[case]
  lines = stderr.strip().splitlines()
  assert status == 2, f"{module} {args}: status {status}\n{stderr[-3000:]}"
  assert len(lines) == 1, f"{module} {args}: {len(lines)} lines on stderr:\n{stderr[-3000:]}"
  assert expected in lines[0], lines[0]
  assert "Traceback" not in stderr and stdout.strip() == ""


def test_verbose_adds_the_traceback(tmp_path):
  done = subprocess.run(
      [sys.executable, "-m", "onestory_jax.evaluate", f"--story={MISSING}.json", f"--samples={tmp_path}", "--verbose"],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert done.returncode == 2
  assert "Traceback (most recent call last)" in done.stderr
  assert done.stderr.strip().splitlines()[-1] == f"{MISSING}.json: story file not found"
