"""Faults the trainer survives, injected for real (docs/faults.md): a preemption notice (SIGTERM) to a running trainer,
with one process and with two (``jax.distributed`` on 127.0.0.1); a second writer on a workdir or a story folder."""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np

from onestory_jax import checkpoints
from onestory_jax import locks
from onestory_jax import preemption
from onestory_jax import trainer as trainer_lib
from tests.helpers import ROOT
from tests.helpers import load_config

STEPS = 20
# No periodic checkpoint before the end: whatever the preempted run leaves is its preemption save.
# One DiT block: compiles faster, and every OneStory module still runs.
OVERRIDES = {
    "num_train_steps": STEPS,
    "checkpoint_every_steps": 1000,
    "log_every_steps": 1,
    "sample_every_steps": 0,
    "model.num_layers": 1,
}
STEP_LINE = re.compile(r"\] \[(\d+)\] ")  # clu's logging writer: "[<step>] loss=..., ..."


def _config():
  return load_config("tiny", **OVERRIDES)


def _train_until_signalled(workdir: str, after_step: int) -> tuple[subprocess.CompletedProcess, list[int]]:
  """``python -m onestory_jax.train`` in a subprocess, sent SIGTERM once it has logged ``after_step``."""
  argv = [sys.executable, "-m", "onestory_jax.train", "--config=configs/onestory.py:tiny", f"--workdir={workdir}"]
  argv += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  logged, err, reached = [], [], threading.Event()

  def read_stderr():
    for line in proc.stderr:
      err.append(line)
      m = STEP_LINE.search(line)
      if m:
        logged.append(int(m.group(1)))
        if logged[-1] >= after_step:
          reached.set()
    reached.set()  # the process ended: do not wait any longer

  reader = threading.Thread(target=read_stderr, daemon=True)
  reader.start()
  reached.wait(timeout=600)
  if proc.poll() is None:
    proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=300)[0]
  reader.join(timeout=60)
  return subprocess.CompletedProcess(argv, proc.returncode, out, "".join(err)), logged


def test_sigterm_saves_the_running_step_and_the_same_command_resumes_exactly(tmp_path):
  workdir = str(tmp_path / "preempted")
  done, logged = _train_until_signalled(workdir, after_step=2)
  assert done.returncode == preemption.EXIT_STATUS, done.stderr[-3000:]
  lines = [l for l in done.stdout.splitlines() if l.startswith("Preempted")]
  assert len(lines) == 1, done.stdout
  step = int(re.match(r"Preempted at step (\d+): its checkpoint is in (.+); run the same command", lines[0]).group(1))
  assert 2 <= step < STEPS and step == max(logged)
  mngr = checkpoints.checkpoint_manager(workdir, _config())
  assert mngr.all_steps() == [step]  # committed, and no other save
  mngr.close()
  assert not [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in d]

  # The same command resumes from that step and ends where an uninterrupted run ends, bit for bit.
  resumed = trainer_lib.train_and_evaluate(_config(), workdir)
  straight = trainer_lib.train_and_evaluate(_config(), str(tmp_path / "straight"))
  assert int(resumed.step) == int(straight.step) == STEPS
  for a, b in zip(jax.tree.leaves(jax.device_get(straight.params)), jax.tree.leaves(jax.device_get(resumed.params))):
    np.testing.assert_array_equal(a, b)


def test_the_watch_sees_sigterm_and_gives_the_handler_back(tmp_path):
  before = signal.getsignal(signal.SIGTERM)
  mngr = checkpoints.checkpoint_manager(str(tmp_path), _config())
  with preemption.Watch(mngr, num_processes=1) as watch:
    assert not watch.reached(1)
    signal.raise_signal(signal.SIGTERM)
    assert watch.reached(2)
  assert signal.getsignal(signal.SIGTERM) is before
  with preemption.Watch(mngr, num_processes=2) as watch:  # several processes: JAX's preemption service keeps SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before and not watch.reached(1)
  mngr.close()


def _two_process_train(workdir: str, logs: str, signal_after_step: int | None) -> list[int]:
  """``python -m onestory_jax.train`` as 2 JAX processes of 2 CPU devices; SIGTERM to process 1 alone once it has
  logged ``signal_after_step`` (None: never). Returns the exit codes."""
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  argv = [sys.executable, "-m", "onestory_jax.train", "--config=configs/onestory.py:tiny", f"--workdir={workdir}"]
  argv += [f"--config.{k}={v}" for k, v in dict(OVERRIDES, num_train_steps=12).items()]
  procs = []
  try:
    for i in range(2):
      env = dict(
          os.environ,
          PYTHONPATH=ROOT,
          JAX_PLATFORMS="cpu",
          JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
          JAX_NUM_PROCESSES="2",
          JAX_PROCESS_ID=str(i),
          XLA_FLAGS="--xla_force_host_platform_device_count=2",
      )
      with open(os.path.join(logs, f"process_{i}.txt"), "w") as out:
        procs.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 600
    while signal_after_step is not None and procs[1].poll() is None and time.monotonic() < deadline:
      with open(os.path.join(logs, "process_1.txt"), errors="replace") as f:
        steps = [int(m) for m in STEP_LINE.findall(f.read())]
      if steps and max(steps) >= signal_after_step:
        procs[1].send_signal(signal.SIGTERM)
        break
      time.sleep(0.2)
    return [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()  # SIGKILL: JAX's preemption notifier keeps SIGTERM
        p.wait(timeout=30)


def test_sigterm_to_one_of_two_processes_saves_the_agreed_step_on_both(tmp_path):
  workdir, logs = str(tmp_path / "run"), str(tmp_path / "logs")
  os.makedirs(logs)
  read = lambda i: open(os.path.join(logs, f"process_{i}.txt"), errors="replace").read()  # noqa: E731
  codes = _two_process_train(workdir, logs, signal_after_step=2)
  assert codes == [preemption.EXIT_STATUS] * 2, read(0)[-3000:] + read(1)[-3000:]
  stopped = [re.findall(r"^Preempted at step (\d+):", read(i), re.M) for i in range(2)]
  assert len(stopped[0]) == 1 and stopped[0] == stopped[1], stopped  # the same step, agreed by both
  step = int(stopped[0][0])
  saved = os.path.join(workdir, "checkpoints", str(step))
  assert {"commit_success.txt", "config", "data", "state"} <= set(os.listdir(saved))  # committed, every item
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(os.path.join(saved, "data")))
  # The same command on both hosts resumes from that step and finishes.
  assert _two_process_train(workdir, logs, signal_after_step=None) == [0, 0], read(0)[-3000:]
  assert f"Resumed from step {step}" in read(0)
  assert checkpoints.load_config_from_workdir(workdir).num_train_steps == 12


def _run(module: str, *flags: str) -> subprocess.CompletedProcess:
  argv = [sys.executable, "-m", module, *flags]
  return subprocess.run(
      argv, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=600
  )


def test_a_second_trainer_on_a_workdir_stops_at_once_naming_the_holder(tmp_path):
  workdir = str(tmp_path / "run")
  with locks.exclusive(workdir, "--workdir", name=".lock.process_0"):  # the first run, as far as the lock goes
    done = _run("onestory_jax.train", "--config=configs/onestory.py:tiny", f"--workdir={workdir}")
  assert done.returncode == 2, done.stderr[-3000:]
  line = done.stderr.strip().splitlines()[-1]
  assert line.startswith(f"--workdir {workdir} is in use by pid {os.getpid()} on ")
  assert os.path.join(workdir, ".lock.process_0") in line
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))  # it wrote nothing


def test_a_second_sampler_on_a_story_folder_stops_before_loading(tmp_path):
  out = str(tmp_path / "story")
  story = os.path.join(ROOT, "onestory_jax", "assets", "stories", "recall.json")
  with locks.exclusive(out, "--out"):
    done = _run("onestory_jax.sample", f"--story={story}", f"--out={out}")
  assert done.returncode == 2, done.stderr[-3000:]
  assert done.stderr.strip().splitlines()[-1].startswith(f"--out {out} is in use by pid {os.getpid()} on ")
  assert sorted(os.listdir(out)) == [".lock"]  # no manifest, no frames


def test_the_lock_is_held_once_per_process_and_released(tmp_path):
  directory = str(tmp_path / "d")
  with locks.exclusive(directory, "--out"):
    holder = os.path.join(directory, ".lock.holder.json")
    assert os.path.exists(holder)
    with locks.exclusive(directory, "--out"):  # the process that holds it: nested use is a no-op
      pass
    assert os.path.exists(holder)
  assert not os.path.exists(holder)
  with locks.exclusive(directory, "--out"):  # released: the next writer gets it
    pass
