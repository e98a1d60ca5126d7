"""Multi-host training on one machine: 2 JAX processes on 127.0.0.1, a checkpoint, a resume on other meshes.

Every process runs the real entry point (``onestory_jax.train.main`` through
tests/multihost_worker.py, which only records what it sees) under ``jax.distributed``, started from
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` exactly as on a GPU cluster without a
cluster manager (:mod:`onestory_jax.distributed`); collectives go over gloo. Each process simulates 2 CPU devices,
so the global mesh has 4.

1. Run A, mesh (data=4): 4 tiny steps, the global batch of 8 split 4 + 4 across the processes, asynchronous orbax
   checkpoints at steps 2 and 4 into one shared workdir.
2. Run B, mesh (fsdp=4) in 2 fresh processes: a copy of the workdir without step 4 resumes from step 2, with the
   state restored straight into the fsdp shardings, and trains steps 3 and 4. Checked: the restored parameters
   equal run A's after step 2 bit for bit and are sharded 4 ways; run B's losses at steps 3 and 4 equal run A's
   (uninterrupted) within rtol 1e-5 (only the order of floating-point reductions may differ between the layouts;
   measured here: identical); both processes saw identical losses.
3. This pytest process (1 process, 8 devices, fsdp=8) restores run A's step 2: the same parameters, and the data
   stream continues with the samples the 2 processes would have loaded next.

The processes compile with the suite's cheaper code generation (conftest.py; same programs in both runs). Every
launch has a deadline; on any failure or timeout all processes are killed and their log tails are shown.
"""

import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from onestory_jax import checkpoints
from onestory_jax import distributed
from onestory_jax import objective
from onestory_jax import trainer as trainer_lib
from onestory_jax.data import pipeline
from tests.helpers import load_config
from tests.helpers import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
STEPS = 4
RESUME_FROM = 2
LAUNCH_TIMEOUT_S = 240
LOSS_RTOL = 1e-5
# The tiny config with one DiT block (compiles faster; every OneStory module still runs).
OVERRIDES = {
    "num_train_steps": STEPS,
    "checkpoint_every_steps": RESUME_FROM,
    "log_every_steps": 1,
    "model.num_layers": 1,
}


# ---------------------------------------------------------------------------- environment detection (no launch)
def test_explicit_launch_reads_the_three_variables():
  env = {
      "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
      "JAX_NUM_PROCESSES": "4",
      "JAX_PROCESS_ID": "3",
      "JAX_LOCAL_DEVICE_IDS": "0,1",
  }
  launch = distributed.detect(env, tpu_vm=False)
  assert launch == distributed.Launch("explicit", "10.0.0.1:1234", 4, 3, (0, 1))
  assert launch.multi_process


@pytest.mark.parametrize(
    "env, names",
    [
        ({"JAX_PROCESS_ID": "0"}, ["JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES"]),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, ["JAX_PROCESS_ID"]),
        ({"JAX_COORDINATOR_ADDRESS": "h:1"}, ["JAX_NUM_PROCESSES", "JAX_PROCESS_ID"]),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, ["JAX_PROCESS_ID=2"]),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, ["JAX_NUM_PROCESSES"]),
        ({"JAX_COORDINATOR_ADDRESS": "h", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, ["host:port"]),
        (
            {
                "JAX_COORDINATOR_ADDRESS": "h:1",
                "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": "0",
                "JAX_LOCAL_DEVICE_IDS": "0,x",
            },
            ["JAX_LOCAL_DEVICE_IDS"],
        ),
    ],
)
def test_half_set_or_malformed_environment_names_the_variables(env, names):
  with pytest.raises(ValueError) as e:
    distributed.detect(env, tpu_vm=False)
  for name in names:
    assert name in str(e.value)


def test_cluster_managers_and_single_process():
  slurm = {
      "SLURM_JOB_ID": "7",
      "SLURM_STEP_NODELIST": "n[1-2]",
      "SLURM_NTASKS": "16",
      "SLURM_PROCID": "5",
      "SLURM_LOCALID": "1",
  }
  assert distributed.detect(slurm, tpu_vm=False).method == "slurm"
  assert distributed.detect({**slurm, "SLURM_NTASKS": "1"}, tpu_vm=False).method == "single"  # one task
  assert distributed.detect({"SLURM_JOB_ID": "7"}, tpu_vm=False).method == "single"  # salloc shell, no srun
  # With a cluster manager, JAX_COORDINATOR_ADDRESS alone is complete: jax takes the rest from the cluster.
  with_addr = distributed.detect({**slurm, "JAX_COORDINATOR_ADDRESS": "n1:5000"}, tpu_vm=False)
  assert (with_addr.method, with_addr.coordinator_address) == ("slurm", "n1:5000")
  ompi = {"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:5000", "OMPI_COMM_WORLD_SIZE": "2"}
  assert distributed.detect(ompi, tpu_vm=False).method == "ompi"
  assert distributed.detect({}, tpu_vm=True).method == "tpu"
  assert distributed.detect({"JAX_PLATFORMS": "cpu"}, tpu_vm=True).method == "single"  # CPU work on a TPU VM
  assert distributed.detect({}, tpu_vm=False) == distributed.Launch("single")
  assert not distributed.Launch("single").multi_process


def test_single_process_initialize_is_a_no_op():
  launch = distributed.initialize_from_env({"JAX_PLATFORMS": "cpu"})
  assert launch.method == "single"
  assert not jax.distributed.is_initialized()


# ---------------------------------------------------------------------------- 2-process train / checkpoint / resume
def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _tail(path: str, n: int = 3000) -> str:
  with open(path, errors="replace") as f:
    return f.read()[-n:]


def _launch(workdir: str, record: str, mesh: str, dump_step: int = 0) -> None:
  """Runs the worker as NUM_PROCESSES JAX processes; returns when all exit 0, else kills them all and fails."""
  os.makedirs(record, exist_ok=True)
  port = _free_port()
  flags = [
      f"--config={os.path.join(ROOT, 'configs', 'onestory.py')}:tiny",
      f"--workdir={workdir}",
      f"--record={record}",
      f"--dump_step={dump_step}",
      f"--config.mesh.shape={mesh}",
  ]
  flags += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  procs, logs = [], []
  try:
    for i in range(NUM_PROCESSES):
      env = dict(
          os.environ,
          PYTHONPATH=ROOT,
          JAX_PLATFORMS="cpu",
          TF_CPP_MIN_LOG_LEVEL="3",
          JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
          JAX_NUM_PROCESSES=str(NUM_PROCESSES),
          JAX_PROCESS_ID=str(i),
          XLA_FLAGS=xla_flags(DEVICES_PER_PROCESS),
      )
      env.pop("JAX_LOCAL_DEVICE_IDS", None)
      logs.append(os.path.join(record, f"log_{i}.txt"))
      with open(logs[-1], "w") as out:
        procs.append(
            subprocess.Popen([sys.executable, WORKER] + flags, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        )
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while any(p.poll() is None for p in procs):
      failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
      if failed or time.monotonic() > deadline:
        why = (
            f"process {failed[0]} exited with {procs[failed[0]].returncode}"
            if failed
            else (f"timed out after {LAUNCH_TIMEOUT_S} s")
        )
        raise AssertionError(
            f"{why}; log tails:\n" + "\n".join(f"--- process {i}:\n{_tail(log)}" for i, log in enumerate(logs))
        )
      time.sleep(0.2)
    codes = [p.returncode for p in procs]
    assert codes == [0] * NUM_PROCESSES, f"exit codes {codes}; log of process 0:\n{_tail(logs[0])}"
  finally:
    for p in procs:  # only the processes started here, by their handles
      if p.poll() is None:
        p.kill()  # SIGKILL: jax's preemption notifier catches SIGTERM and a hung process would stay
        p.wait(timeout=30)


def _observations(record: str) -> list[dict]:
  obs = []
  for i in range(NUM_PROCESSES):
    with open(os.path.join(record, f"process_{i}.json")) as f:
      obs.append(json.load(f))
  return obs


def _params(record: str, name: str, process: int) -> dict:
  with np.load(os.path.join(record, f"{name}_process_{process}.npz")) as z:
    return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
  """Run A: 2 processes, mesh data=4, steps 1-4, checkpoints at 2 and 4; (workdir, record dir, params after 2)."""
  root = tmp_path_factory.mktemp("multihost")
  workdir, record = str(root / "run_a"), str(root / "rec_a")
  _launch(workdir, record, mesh="(-1,1,1,1)", dump_step=RESUME_FROM)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [str(RESUME_FROM), str(STEPS)]
  return workdir, record, _params(record, f"params_step{RESUME_FROM}", 0)


def test_two_processes_train_checkpoint_and_resume_on_another_mesh(run_a, tmp_path):
  workdir_a, rec_a, saved = run_a
  run_b, rec_b = str(tmp_path / "run_b"), str(tmp_path / "rec_b")
  shutil.copytree(workdir_a, run_b)
  shutil.rmtree(os.path.join(run_b, "checkpoints", str(STEPS)))  # as if run A had been stopped after step 2
  _launch(run_b, rec_b, mesh="(1,-1,1,1)")

  obs_a, obs_b = _observations(rec_a), _observations(rec_b)
  for obs, mesh in ((obs_a, {"data": 4, "fsdp": 1}), (obs_b, {"data": 1, "fsdp": 4})):
    assert [o["process_index"] for o in obs] == list(range(NUM_PROCESSES))
    assert all(
        o["process_count"] == NUM_PROCESSES
        and o["local_device_count"] == DEVICES_PER_PROCESS
        and o["device_count"] == NUM_PROCESSES * DEVICES_PER_PROCESS
        for o in obs
    )
    assert all({k: o["mesh"][k] for k in mesh} == mesh for o in obs)
    assert obs[0]["losses"] == obs[1]["losses"]  # every process saw the same (replicated) loss
  assert obs_a[0]["restored_step"] is None and list(obs_a[0]["losses"]) == ["1", "2", "3", "4"]
  assert obs_b[0]["restored_step"] == RESUME_FROM and list(obs_b[0]["losses"]) == ["3", "4"]
  # The probe kernel [embed=32, mlp=64]: whole on every device of the data mesh, a quarter under fsdp=4.
  assert obs_a[0]["probe_shard_shape"] == [32, 64] and obs_b[0]["probe_shard_shape"] == [8, 64]

  # The restored state is the saved one, bit for bit, seen whole from both processes.
  assert len(saved) > 50
  for i in range(NUM_PROCESSES):
    restored = _params(rec_b, "params_restored", i)
    assert restored.keys() == saved.keys()
    for k in saved:
      np.testing.assert_array_equal(restored[k], saved[k], err_msg=k)

  # Resumed on fsdp = uninterrupted on data, up to reduction order.
  resumed = [obs_b[0]["losses"][s] for s in ("3", "4")]
  uninterrupted = [obs_a[0]["losses"][s] for s in ("3", "4")]
  assert np.all(np.isfinite(resumed))
  np.testing.assert_allclose(resumed, uninterrupted, rtol=LOSS_RTOL)
  assert os.path.isdir(os.path.join(run_b, "checkpoints", str(STEPS)))


def test_one_process_restores_the_two_process_checkpoint(run_a):
  """Another process and device count: this single process (8 devices, fsdp=8) restores run A's step 2."""
  workdir, _, saved = run_a
  assert jax.process_count() == 1 and jax.device_count() == 8
  config = load_config("tiny", **OVERRIDES, **{"mesh.shape": (1, -1, 1, 1)})
  tr = trainer_lib.Trainer(config)
  mngr = checkpoints.checkpoint_manager(workdir, config)
  it = iter(tr.dataset())
  state = checkpoints.restore_checkpoint(mngr, RESUME_FROM, tr.program.abstract_state, it)
  mngr.close()
  probe = state.params["dit"]["blocks_0"]["ffn"]["net_0"]["proj"]["kernel"]
  assert probe.sharding.shard_shape(probe.shape) == (4, 64)
  assert int(state.step) == RESUME_FROM
  restored = {
      jax.tree_util.keystr(p): np.asarray(x)
      for p, x in jax.tree_util.tree_leaves_with_path(jax.device_get(state.params))
  }
  assert restored.keys() == saved.keys()
  for k in saved:
    np.testing.assert_array_equal(restored[k], saved[k], err_msg=k)
  # The next global batch holds the samples that the 2 processes would have loaded next, interleaved.
  batch = next(it)
  for p in range(NUM_PROCESSES):
    ds = pipeline.make_train_dataset(
        config,
        warmup_steps=objective.dc_warmup_steps(config),
        process_index=p,
        process_count=NUM_PROCESSES,
        tokenizer=tr.system.tokenizer,
    )
    local = next(itertools.islice(iter(ds), RESUME_FROM, None))
    for k in batch:
      np.testing.assert_array_equal(batch[k][p::NUM_PROCESSES], local[k], err_msg=k)


def test_another_process_count_needs_one_common_iterator_state(tmp_path):
  data = tmp_path / "checkpoints" / "2" / "data"
  data.mkdir(parents=True)
  (data / "process_0-of-2.json").write_text('{"next_index": 2}')
  (data / "process_1-of-2.json").write_text('{"next_index": 3}')
  mngr = checkpoints.checkpoint_manager(str(tmp_path), load_config("tiny"))
  with pytest.raises(ValueError, match="process_0-of-2.json, process_1-of-2.json"):
    checkpoints.restore_checkpoint(mngr, 2, {}, data_iter=iter([]))
  mngr.close()
