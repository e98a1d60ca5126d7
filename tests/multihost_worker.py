r"""One process of the multi-process test (tests/test_multihost.py): the real training entry point, instrumented.

Runs :func:`onestory_jax.train.main` (``jax.distributed`` from the environment, then
``trainer.train_and_evaluate``) with the same flags as ``python -m onestory_jax.train``, plus two of its own:

* ``--record=DIR``: this process writes ``DIR/process_<i>.json`` with the loss it saw after every step, the
  process and device counts, the mesh shape, the shard shape of one parameter and its CPU seconds.
* ``--dump_step=N``: the parameters right after step N (gathered to every host) go to
  ``DIR/params_step<N>_process_<i>.npz``; parameters restored from a checkpoint go to
  ``DIR/params_restored_process_<i>.npz``.

Nothing in the training code changes: the worker wraps ``Trainer.step`` and ``checkpoints.restore_checkpoint`` to
observe them. Launched as ``python tests/multihost_worker.py --config=configs/onestory.py:tiny --workdir=DIR ...``
with ``PYTHONPATH`` at the repository root and the ``JAX_*`` variables of :mod:`onestory_jax.distributed`.
"""

from __future__ import annotations

import json
import os
import resource
from typing import Any

from absl import app
from absl import flags
import jax
import numpy as np

from onestory_jax import checkpoints
from onestory_jax import sharding
from onestory_jax import train
from onestory_jax import trainer

_RECORD = flags.DEFINE_string("record", None, "Directory for this process's observations.")
_DUMP_STEP = flags.DEFINE_integer("dump_step", 0, "Write the parameters after this step (0: never).")
flags.mark_flags_as_required(["record"])

PROBE = ("dit", "blocks_0", "ffn", "net_0", "proj", "kernel")  # logical axes (embed, mlp): its shard shows the mesh


def _host_copy(tree: Any, mesh: jax.sharding.Mesh) -> dict[str, np.ndarray]:
  """Every leaf gathered to every process (a collective: all processes call it), keyed by its tree path."""
  full = jax.jit(lambda t: t, out_shardings=sharding.replicated(mesh))(tree)
  leaves = jax.tree_util.tree_leaves_with_path(full)
  return {jax.tree_util.keystr(p): np.asarray(x.addressable_data(0)) for p, x in leaves}


def _probe(params: Any) -> Any:
  node = params
  for k in PROBE:
    node = node.get(k) if isinstance(node, dict) else None
  return node


def _cpu_s() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return round(r.ru_utime + r.ru_stime, 2)


def main(argv):
  record = _RECORD.value
  pid = jax.process_index
  obs = {"losses": {}, "restored_step": None, "cpu_s_after_step": {}, "cpu_s_at_start": _cpu_s()}

  def save_npz(name: str, tree: Any, mesh) -> None:
    arrays = _host_copy(tree, mesh)
    np.savez(os.path.join(record, f"{name}_process_{pid()}.npz"), **arrays)

  step_fn = trainer.Trainer.step

  def step(self, state, local_batch):
    state, metrics = step_fn(self, state, local_batch)
    n = int(jax.device_get(state.step))
    obs["cpu_s_after_step"][n] = _cpu_s()
    obs["losses"][n] = float(jax.device_get(metrics["loss"]))
    obs["mesh"] = dict(self.mesh.shape)
    probe = _probe(state.params)
    obs["probe_shard_shape"] = None if probe is None else list(probe.sharding.shard_shape(probe.shape))
    if n == _DUMP_STEP.value:
      save_npz(f"params_step{n}", state.params, self.mesh)
    return state, metrics

  restore_fn = checkpoints.restore_checkpoint

  def restore(mngr, step_, abstract_state, data_iter=None):
    state = restore_fn(mngr, step_, abstract_state, data_iter)
    obs["restored_step"] = int(step_)
    mesh = jax.tree.leaves(abstract_state)[0].sharding.mesh
    save_npz("params_restored", state.params, mesh)
    return state

  trainer.Trainer.step = step
  checkpoints.restore_checkpoint = restore
  train.main(argv)
  obs.update(
      cpu_s=_cpu_s(),
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      device_count=jax.device_count(),
      local_device_count=jax.local_device_count(),
  )
  with open(os.path.join(record, f"process_{jax.process_index()}.json"), "w") as f:
    json.dump(obs, f, indent=1)


if __name__ == "__main__":
  app.run(main)
