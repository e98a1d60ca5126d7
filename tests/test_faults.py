"""Faults the trainer and the sampler survive, injected for real (docs/faults.md): a preemption notice (SIGTERM) to a
running trainer, with one process and with two (``jax.distributed`` on 127.0.0.1); a second writer on a workdir or a
story folder; cut and incomplete checkpoints; a full disk (a small tmpfs); a NaN learning rate and NaN data; sampler
settings that are not finite; a caption longer than the text encoder takes."""

import io
import json
import logging
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from onestory_jax import checkpoints
from onestory_jax import locks
from onestory_jax import logs
from onestory_jax import preemption
from onestory_jax import pipeline
from onestory_jax import sampler
from onestory_jax import story as story_lib
from onestory_jax import trainer as trainer_lib
from onestory_jax import video_io
from tests.helpers import ROOT
from tests.helpers import load_config
from tests.helpers import xla_flags

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
          XLA_FLAGS=xla_flags(2),
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


# ---------------------------------------------------------------------------------------------------------------
# A straight run to compare against: 6 steps, checkpoints at 2, 4 and 6 (2 kept), one DiT block.
RUN = dict(OVERRIDES, num_train_steps=6, checkpoint_every_steps=2, log_every_steps=2)


def _run_config(**overrides):
  return load_config("tiny", **dict(RUN, **overrides))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """(workdir, final params) of an uninterrupted 6-step run; tests copy the workdir before changing it."""
  workdir = str(tmp_path_factory.mktemp("straight") / "run")
  state = trainer_lib.train_and_evaluate(_run_config(), workdir)
  return workdir, jax.device_get(state.params)


def _copy(straight_run, tmp_path, name="run") -> str:
  workdir = str(tmp_path / name)
  shutil.copytree(straight_run[0], workdir, ignore=shutil.ignore_patterns(".lock*"))
  return workdir


def _assert_same_params(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(jax.device_get(b))):
    np.testing.assert_array_equal(x, y)


def _cut(step_dir: str) -> list[str]:
  """Cuts every data file of a saved train state in half, as a copy that stopped half-way would; returns them.

  Every file, not one: which data file holds what varies from save to save (OCDBT batches the writes), and a file
  that a restore does not read (a per-process B-tree node superseded by the merged index) would leave the
  checkpoint readable. The merged index is always read, so the restore fails the same way every time."""
  files = [
      os.path.join(d, f)
      for d, _, fs in os.walk(os.path.join(step_dir, "state"))
      if os.path.basename(d) == "d"
      for f in fs
  ]
  assert files, f"no OCDBT data files under {step_dir}/state"
  for f in files:
    os.truncate(f, os.path.getsize(f) // 2)
  return files


def test_a_cut_latest_checkpoint_is_moved_aside_and_the_one_before_resumes_exactly(straight, tmp_path):
  workdir = _copy(straight, tmp_path)
  ckpt = os.path.join(workdir, "checkpoints")
  assert sorted(os.listdir(ckpt)) == ["4", "6"]
  _cut(os.path.join(ckpt, "6"))

  # Readers (sampling, export) skip it without moving anything: they do not own the workdir.
  assert checkpoints.load_config_from_workdir(workdir).num_train_steps == 6
  system, params, _ = checkpoints.load_for_sampling(workdir)
  assert sorted(os.listdir(ckpt)) == ["4", "6"]

  # Training moves it aside with its reason, resumes from step 4 and ends where the straight run ended.
  _assert_same_params(straight[1], trainer_lib.train_and_evaluate(_run_config(), workdir).params)
  aside = os.path.join(workdir, checkpoints.UNREADABLE)
  assert os.listdir(aside) == ["6"]
  reason = open(os.path.join(aside, "6", "UNREADABLE.txt")).read()
  assert "OUT_OF_RANGE" in reason and "\n" not in reason.strip()
  assert sorted(os.listdir(ckpt)) == ["4", "6"]  # a new step 6

  # Its tree metadata gone: the same again, and the one moved aside before stays.
  os.remove(os.path.join(ckpt, "6", "state", "_METADATA"))
  _assert_same_params(straight[1], trainer_lib.train_and_evaluate(_run_config(), workdir).params)
  assert sorted(os.listdir(aside)) == ["6", "6.1"]
  assert "_METADATA" in open(os.path.join(aside, "6.1", "UNREADABLE.txt")).read()


def test_with_every_checkpoint_unreadable_a_fresh_start_waits_for_the_user(straight, tmp_path):
  workdir = _copy(straight, tmp_path)
  for step in ("4", "6"):
    _cut(os.path.join(workdir, "checkpoints", step))
  with pytest.raises(checkpoints.NoReadableCheckpoint, match=r"no readable checkpoint is left.*move .* away"):
    trainer_lib.train_and_evaluate(_run_config(), workdir)
  assert sorted(os.listdir(os.path.join(workdir, checkpoints.UNREADABLE))) == ["4", "6"]
  assert os.listdir(os.path.join(workdir, "checkpoints")) == []
  with pytest.raises(checkpoints.NoReadableCheckpoint):  # the next run does not start afresh on its own either
    trainer_lib.train_and_evaluate(_run_config(), workdir)


def test_a_checkpoint_of_another_model_is_named_and_left_in_place(straight, tmp_path):
  workdir = _copy(straight, tmp_path)
  with pytest.raises(checkpoints.CheckpointMismatch, match=r"checkpoint 6 .* another model .*params\.dit\.blocks_1"):
    trainer_lib.train_and_evaluate(_run_config(**{"model.num_layers": 2}), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "6"]
  assert not os.path.exists(os.path.join(workdir, checkpoints.UNREADABLE))


def _can_mount_tmpfs() -> bool:
  probe = subprocess.run(
      ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
      capture_output=True,
  )
  return probe.returncode == 0


def test_a_full_disk_stops_the_run_in_one_line_and_the_last_committed_checkpoint_resumes(straight, tmp_path):
  """A 7 MiB tmpfs holds one or two checkpoints (3-4 MiB each) but not three. Where this machine cannot mount one
  (no user namespaces), a file-size limit makes the first save's writes fail (EFBIG instead of ENOSPC)."""
  workdir = str(tmp_path / "run")
  argv = [sys.executable, "-m", "onestory_jax.train", "--config=configs/onestory.py:tiny", f"--workdir={workdir}"]
  argv += [f"--config.{k}={v}" for k, v in RUN.items()]
  env = dict(os.environ, PYTHONPATH=ROOT)
  if _can_mount_tmpfs():
    disk = str(tmp_path / "disk")
    os.makedirs(disk)
    # Train on the tmpfs, then copy what it left to the real disk before the mount namespace goes.
    script = (
        f"mount -t tmpfs -o size=7m tmpfs {disk} && {shlex.join(argv[:4])} --workdir={disk}/run "
        f"{shlex.join(argv[5:])}; rc=$?; cp -r {disk}/run {workdir}; exit $rc"
    )
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    where = f"{disk}/run/checkpoints"
  else:

    def limit():  # every file this process writes stops at 64 KiB; a write past it fails instead of killing it
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
      resource.setrlimit(resource.RLIMIT_FSIZE, (2**16, 2**16))

    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, preexec_fn=limit)
    where = f"{workdir}/checkpoints"
  assert done.returncode == 1, done.stderr[-3000:]
  errors = [l for l in done.stderr.splitlines() if "Traceback" in l or l.startswith("Saving checkpoint")]
  assert len(errors) == 1, done.stderr[-5000:]  # one line, no tracebacks
  assert re.match(rf"Saving checkpoint \d+ in {where} failed \(.*(No space left on device|File too large)", errors[0])
  last = re.search(rf"checkpoint (\d+) \({where}/(\d+)\) is the last committed one", errors[0])
  assert last or "no checkpoint has committed yet" in errors[0], errors[0]
  committed = [int(last.group(1))] if last else []

  # Nothing after the failure was saved; what was committed is intact: the same command resumes from it and ends
  # where the straight run ended.
  assert checkpoints.checkpoint_manager(workdir, _run_config()).all_steps() == committed
  _assert_same_params(straight[1], trainer_lib.train_and_evaluate(_run_config(), workdir).params)


def test_a_nan_learning_rate_stops_the_run_naming_the_step_without_saving_it(straight, tmp_path):
  workdir = _copy(straight, tmp_path)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))  # the run stands at step 4
  done = _run(
      "onestory_jax.train",
      "--config=configs/onestory.py:tiny",
      f"--workdir={workdir}",
      "--config.optim.lr=nan",
      *[f"--config.{k}={v}" for k, v in RUN.items()],
  )
  assert done.returncode == 1, done.stderr[-3000:]
  line = done.stderr.strip().splitlines()[-1]
  assert re.match(
      r"Non-finite step 5 \(loss=[-+0-9.e]+, grad_norm=[-+0-9.e]+, update_norm=nan\); training stopped", line
  )
  assert "checkpoint 4 is the last good state" in line and "skip_nonfinite_steps" in line
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4"]  # nothing of step 5 or 6
  _assert_same_params(straight[1], trainer_lib.train_and_evaluate(_run_config(), workdir).params)


def test_skip_nonfinite_steps_leaves_the_state_as_it_was_and_counts_the_step():
  config = _run_config(skip_nonfinite_steps=2)
  tr = trainer_lib.Trainer(config)
  state = tr.init_state()
  batch = next(iter(tr.dataset()))
  poisoned = dict(batch, sel_labels=np.full_like(batch["sel_labels"], np.nan))  # NaN data: l_sel is NaN
  before = jax.device_get(state.params)  # the step donates the state
  after, m = tr.step(state, poisoned)
  m = jax.device_get(m)
  assert not np.isfinite(m["loss"]) and m["nonfinite_skipped"] == 1 and m["nonfinite"] == 0
  _assert_same_params(before, after.params)
  for _ in range(2):  # finite batches are applied again (the first at the schedule's step 0, learning rate 0)
    after, m = tr.step(after, batch)
    m = jax.device_get(m)
    assert m["nonfinite_skipped"] == 0 and m["nonfinite"] == 0
  assert m["update_norm"] > 0

  # Without skipping, the same batch is flagged: the loop stops the run on it.
  plain = trainer_lib.Trainer(_run_config())
  _, m = plain.step(plain.init_state(), poisoned)
  assert jax.device_get(m["nonfinite"]) == 1


def test_sampler_settings_and_story_files_are_checked_before_anything_runs(tmp_path):
  out = str(tmp_path / "story")
  story = os.path.join(ROOT, "onestory_jax", "assets", "stories", "recall.json")
  done = _run("onestory_jax.sample", f"--story={story}", f"--out={out}", "--guidance=nan")
  assert done.returncode == 2, done.stderr[-3000:]
  assert (
      done.stderr.strip().splitlines()[-1]
      == "--guidance must be a finite number (the classifier-free guidance scale), got nan"
  )
  assert "Traceback" not in done.stderr and not os.path.exists(out)
  for flags, message in [
      (dict(steps=0), "--steps must be an integer >= 1, got 0"),
      (dict(shift=float("inf")), "--shift must be a finite number > 0"),
      (dict(shift=-1.0), "--shift must be a finite number > 0"),
      (dict(memory_guidance=-0.5), "--memory_guidance must be a finite number >= 0"),
      (dict(memory_guidance=float("nan")), "--memory_guidance must be a finite number >= 0"),
  ]:
    with pytest.raises(ValueError, match=re.escape(message)):
      sampler.check_settings(**flags)
  sampler.check_settings(steps=1, shift=3.0, guidance=-1.0)
  bad = tmp_path / "nan.json"
  bad.write_text('{"shots": [{"caption": "a red round character.", "environment": NaN}]}')
  with pytest.raises(ValueError, match=r"nan\.json: NaN is not JSON"):
    story_lib.load_story(str(bad))


def test_a_long_caption_is_truncated_with_a_warning_and_manifests_are_strict_json(tmp_path, caplog):
  system, params, enc = checkpoints.load_for_sampling(None)
  capacity = system.tokenizer.capacity()
  fits = "a red round character moves left in a blue place, wide view."
  long = " ".join(["the same first round character moves right in a new green place, close view."] * 10)
  dropped = system.tokenizer.dropped([fits, long])
  assert dropped[0] == 0 and dropped[1] > 0
  assert len(system.tokenizer._pieces([long])[0]) - dropped[1] == capacity  # pylint: disable=protected-access
  story = story_lib.parse_story({"shots": [{"caption": fits}, {"caption": long}]}, where="story.json")
  pipe = pipeline.OneStoryPipeline(system, params, enc, steps=1, shift=3.0, guidance=1.0)
  with caplog.at_level("WARNING"):
    run = pipe.generate(story.captions, seed=0, out=str(tmp_path / "out"))
  manifest = run.manifest
  warned = [r.getMessage() for r in caplog.records if "tokens longer" in r.getMessage()]
  assert warned == [
      f"shot 1: the caption is {dropped[1]} tokens longer than the text encoder takes ({capacity}); its last "
      f"{dropped[1]} tokens are dropped"
  ]
  assert len(manifest["shots"]) == 2

  def reject(constant):
    raise AssertionError(f"manifest holds {constant}")

  json.loads(open(tmp_path / "out" / "manifest.json").read(), parse_constant=reject)
  with pytest.raises(ValueError, match="not JSON-serialisable"):
    video_io.atomic_write_json(str(tmp_path / "x.json"), {"score": float("nan")})


def test_the_log_filter_drops_orbax_failures_that_asyncio_reports_for_a_gathering_future():
  """asyncio's record of a gathering future names no coroutine; its exception's traceback has orbax's frames."""
  source = "def write():\n  raise ValueError('RESOURCE_EXHAUSTED: No space left on device')\n"
  scope = {}  # a function whose frames say they are orbax's
  exec(compile(source, "/venv/site-packages/orbax/checkpoint/_src/serialization/serialization.py", "exec"), scope)
  try:
    scope["write"]()
  except ValueError:
    orbax_error = sys.exc_info()
  try:
    raise ValueError("elsewhere")
  except ValueError:
    other_error = sys.exc_info()
  message = "_GatheringFuture exception was never retrieved\nfuture: <_GatheringFuture finished exception=ValueError()>"
  record = lambda name, exc_info: logging.LogRecord(  # noqa: E731
      name, logging.ERROR, "base_events.py", 1771, message, None, exc_info
  )
  f = logs._OrbaxFailureFilter()  # pylint: disable=protected-access
  assert not f.filter(record("asyncio", orbax_error))
  assert f.filter(record("asyncio", other_error)) and f.filter(record("asyncio", None))
  assert f.filter(record("myapp", orbax_error))  # only asyncio's reports of orbax's work, and orbax's own logs


def test_the_stderr_filter_drops_only_closed_loop_tracebacks():
  out = io.StringIO()
  f = logs._ClosedLoopFilter(out)  # pylint: disable=protected-access
  noise = (
      'Traceback (most recent call last):\n  File "x.py", line 1, in f\n    g()\nRuntimeError: Event loop is closed\n'
  )
  real = 'Traceback (most recent call last):\n  File "y.py", line 2, in h\nValueError: bad\n'

  def write(text):
    for i in range(0, len(text), 7):  # in pieces, as C code writes them
      f.write(text[i : i + 7])

  threads = [threading.Thread(target=write, args=(t,)) for t in (noise, "plain line\n", noise, real)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert "Event loop is closed" not in out.getvalue()
  assert "plain line\n" in out.getvalue() and real in out.getvalue()
  assert f.write("\rstep 3/10") == len("\rstep 3/10") and out.getvalue().endswith("\rstep 3/10")  # not held back
