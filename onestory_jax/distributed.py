"""Multi-process start-up: ``jax.distributed`` initialised from the environment.

JAX's own multi-host runtime does the work; this module only decides, from the environment,
whether and how to call :func:`jax.distributed.initialize`, before any JAX computation. The entry points
(``onestory_jax.train``, ``onestory_jax.sample``) call :func:`initialize_from_env` first.

What ``jax.distributed.initialize()`` with no arguments reads by itself on jax 0.10.2 (``jax/_src/distributed.py``
and ``jax/_src/clusters/``):

* ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), ``JAX_LOCAL_DEVICE_IDS`` (comma-separated ids of the
  devices this process drives), ``JAX_COORDINATOR_BIND_ADDRESS`` and ``JAX_PARTITION_INDEX``; with an
  auto-detected cluster also ``JAX_COORDINATOR_PORT``.
* The process count and id only from a detected cluster manager:

  - Cloud TPU VMs (jax marks them at import when libtpu and TPU chips are present): the GCE metadata server, or
    ``TPU_WORKER_HOSTNAMES`` / ``TPU_PROCESS_ADDRESSES`` with ``TPU_WORKER_ID`` on GKE; ``MEGASCALE_*`` for
    multi-slice.
  - SLURM: ``SLURM_JOB_ID``, ``SLURM_STEP_NODELIST``, ``SLURM_NTASKS``, ``SLURM_PROCID`` and ``SLURM_LOCALID``, all
    set (inside ``srun``).
  - Open MPI: ``OMPI_MCA_orte_hnp_uri`` with ``OMPI_COMM_WORLD_SIZE`` / ``_RANK`` / ``_LOCAL_RANK`` (``mpirun``).

  Under SLURM and Open MPI on GPUs jax then drives one GPU per process (the one at the local rank): launch one task
  per GPU (``srun --ntasks-per-node=8``), or one task per node with ``JAX_LOCAL_DEVICE_IDS=0,1,...,7``.

jax reads no plain process count or id, so a multi-node GPU launch without a cluster manager sets three variables
on every node, which this module passes to ``jax.distributed.initialize`` explicitly (cluster detection off)::

  JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 python -m onestory_jax.train ...
  JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 python -m onestory_jax.train ...

``JAX_LOCAL_DEVICE_IDS=0,1,2,3`` optionally restricts a process to some of its node's GPUs (several processes per
node). Anything else runs as a single process. A half-set environment (a process id without a count, a coordinator
with neither, a malformed value) raises a ValueError that names the variables.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

from absl import logging
import jax

COORDINATOR = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES = "JAX_NUM_PROCESSES"
PROCESS_ID = "JAX_PROCESS_ID"
LOCAL_DEVICE_IDS = "JAX_LOCAL_DEVICE_IDS"
_SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_OMPI = ("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE")


@dataclasses.dataclass(frozen=True)
class Launch:
  """How this process takes part in the run.

  Attributes:
    method: ``single`` (no ``jax.distributed``), ``explicit`` (the three JAX_* variables), or the cluster that jax
      detects itself: ``tpu``, ``slurm`` or ``ompi``.
    coordinator_address: ``host:port`` of process 0 when known here (``explicit``, or a cluster launch with
      ``JAX_COORDINATOR_ADDRESS`` set); otherwise jax derives it.
    num_processes: the process count when known here.
    process_id: this process's id when known here.
    local_device_ids: the devices this process drives, or None for all of its node's.
  """

  method: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None

  @property
  def multi_process(self) -> bool:
    return self.method != "single"


def on_cloud_tpu_vm() -> bool:
  """True on a Cloud TPU VM with TPU chips and libtpu (what jax found at import; no backend is started)."""
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
  except ImportError:  # a jax without the module: fall back to no TPU detection
    return False
  return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def _int(environ: Mapping[str, str], name: str, minimum: int) -> int:
  raw = environ[name].strip()
  try:
    value = int(raw)
  except ValueError:
    raise ValueError(f"{name}={environ[name]!r}: expected an integer") from None
  if value < minimum:
    raise ValueError(f"{name}={raw}: expected an integer >= {minimum}")
  return value


def _address(raw: str) -> str:
  host, sep, port = raw.strip().rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"{COORDINATOR}={raw!r}: expected host:port of process 0, e.g. 10.0.0.1:1234")
  return raw.strip()


def _device_ids(raw: str) -> tuple[int, ...]:
  try:
    ids = tuple(int(x) for x in raw.split(","))
  except ValueError:
    ids = ()
  if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
    raise ValueError(f"{LOCAL_DEVICE_IDS}={raw!r}: expected distinct device ids separated by commas, e.g. 0,1,2,3")
  return ids


def detect(environ: Mapping[str, str] | None = None, *, tpu_vm: bool | None = None) -> Launch:
  """The :class:`Launch` that ``environ`` (default ``os.environ``) describes; starts nothing.

  Args:
    environ: the environment variables.
    tpu_vm: whether this is a Cloud TPU VM (default: :func:`on_cloud_tpu_vm`); ignored when ``JAX_PLATFORMS`` is
      set without ``tpu``.

  Raises:
    ValueError: a half-set or malformed environment; the message names the variables and what is expected.
  """
  env = os.environ if environ is None else environ
  address = _address(env[COORDINATOR]) if env.get(COORDINATOR, "").strip() else None
  ids = _device_ids(env[LOCAL_DEVICE_IDS]) if env.get(LOCAL_DEVICE_IDS, "").strip() else None

  explicit = [k for k in (NUM_PROCESSES, PROCESS_ID) if env.get(k, "").strip()]
  if explicit:
    missing = [k for k in (COORDINATOR, NUM_PROCESSES, PROCESS_ID) if not env.get(k, "").strip()]
    if missing:
      raise ValueError(
          f"{' and '.join(explicit)} set but {' and '.join(missing)} not: a multi-process launch "
          f"without a cluster manager sets all of {COORDINATOR} (host:port of process 0), "
          f"{NUM_PROCESSES} and {PROCESS_ID} on every process"
      )
    n = _int(env, NUM_PROCESSES, 1)
    i = _int(env, PROCESS_ID, 0)
    if i >= n:
      raise ValueError(f"{PROCESS_ID}={i} must be smaller than {NUM_PROCESSES}={n}")
    return Launch("explicit", address, n, i, ids)

  platforms = env.get("JAX_PLATFORMS", "").strip()
  tpu_allowed = not platforms or "tpu" in platforms.split(",")
  if tpu_allowed and (on_cloud_tpu_vm() if tpu_vm is None else tpu_vm):
    return Launch("tpu", address, local_device_ids=ids)
  if all(k in env for k in _SLURM) and _int(env, "SLURM_NTASKS", 1) > 1:
    return Launch("slurm", address, local_device_ids=ids)
  if all(k in env for k in _OMPI) and _int(env, "OMPI_COMM_WORLD_SIZE", 1) > 1:
    return Launch("ompi", address, local_device_ids=ids)
  if address is not None:
    raise ValueError(
        f"{COORDINATOR} set but neither {NUM_PROCESSES} nor {PROCESS_ID}, and no SLURM, Open MPI "
        f"or Cloud TPU launch was detected to supply them: set {NUM_PROCESSES} and {PROCESS_ID} "
        f"on every process, or unset {COORDINATOR} for a single-process run"
    )
  return Launch("single")


def initialize_from_env(environ: Mapping[str, str] | None = None) -> Launch:
  """Calls :func:`jax.distributed.initialize` as :func:`detect` says; a no-op for single-process runs.

  Must run before any JAX computation (``jax.devices()`` included). Idempotent: a second call, once
  ``jax.distributed`` is up, only returns the launch.
  """
  launch = detect(environ)
  if not launch.multi_process or jax.distributed.is_initialized():
    return launch
  if launch.method == "explicit":
    jax.distributed.initialize(
        coordinator_address=launch.coordinator_address,
        num_processes=launch.num_processes,
        process_id=launch.process_id,
        local_device_ids=launch.local_device_ids,
        cluster_detection_method="deactivate",
    )
  else:  # jax detects the cluster itself; pinning the method keeps it from picking another one
    jax.distributed.initialize(
        coordinator_address=launch.coordinator_address,
        local_device_ids=launch.local_device_ids,
        cluster_detection_method=None if launch.method == "tpu" else launch.method,
    )
  logging.info(
      "jax.distributed (%s): process %d of %d, %d local of %d devices",
      launch.method,
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
  )
  return launch
