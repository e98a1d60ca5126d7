"""Preemption: when the machine is taken away, save where the run stands, then stop with :data:`EXIT_STATUS`.

* One process: a SIGTERM handler records the notice; the training loop saves after the step that is running and
  stops. SIGTERM is what preemptible VMs, spot instances, SLURM and Kubernetes send before they kill a job.
* Several processes (``jax.distributed``): JAX's preemption service catches SIGTERM (and, on TPU VMs, the
  maintenance notice of the coordination service) on any host, and the processes agree on the step to save at;
  orbax's ``CheckpointManager.reached_preemption`` says when every process has reached it. No Python handler is
  installed then, so the service keeps the signal.

The checkpoint of the preempted step holds the state, the data iterator and the config like any other, so re-running
the same command resumes from it exactly.
"""

from __future__ import annotations

import signal
import threading

import orbax.checkpoint as ocp

EXIT_STATUS = 143  # 128 + SIGTERM: what job schedulers read as "terminated", so a requeue policy applies


class Preempted(Exception):
  """Raised by the training loop after the preempted step's checkpoint has committed."""

  def __init__(self, step: int, checkpoint_dir: str):
    super().__init__(
        f"Preempted at step {step}: its checkpoint is in {checkpoint_dir}; run the same command again to resume"
    )
    self.step = step
    self.checkpoint_dir = checkpoint_dir


class Watch:
  """Says, at every step, whether the run has been told to stop (use as a context manager around the loop)."""

  def __init__(self, mngr: ocp.CheckpointManager, num_processes: int):
    self._mngr = mngr
    self._notice = threading.Event()
    self._previous = None
    if num_processes == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame) -> None:
    del signum, frame  # only a flag here: the loop saves at the next step boundary
    self._notice.set()

  def reached(self, step: int) -> bool:
    """True at the step to save and stop at: after a SIGTERM (one process), or at the step every process agreed on."""
    return self._notice.is_set() or self._mngr.reached_preemption(step)

  def __enter__(self) -> "Watch":
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
