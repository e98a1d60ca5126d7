r"""Trains OneStory.

  python -m onestory_jax.train --config=configs/onestory.py:demo --workdir=workdirs/demo \
      [--config.num_train_steps=N ...]

Re-running the same command resumes from the latest checkpoint in ``--workdir``, also on another mesh shape
(``--config.mesh.shape``) or device count: the state is restored straight into the new shardings.

Faults (docs/faults.md) end the run with one line on stderr and an exit status: a preemption notice (SIGTERM, or the
TPU maintenance notice) saves the step the run is on, prints ``Preempted at step N ...`` and exits 143, and the same
command resumes from that step exactly; a failed checkpoint save or a non-finite step exits 1, naming the step and
the checkpoint to resume from; bad input (a config that does not fit the workdir's checkpoints, a workdir that
another run holds) exits 2. ``--verbose`` adds the traceback.

Multi-host: run the same command on every host (TPU VM workers, SLURM ``srun``, ``mpirun``, or a plain launch with
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` set); ``jax.distributed`` is initialised
from the environment first (:mod:`onestory_jax.distributed`), each process loads its share of the global batch, and
``--workdir`` must be a path that every host sees (e.g. ``gs://BUCKET/run``).
"""

import sys

from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from onestory_jax import checkpoints
from onestory_jax import compilation_cache
from onestory_jax import distributed
from onestory_jax import locks
from onestory_jax import logs
from onestory_jax import preemption
from onestory_jax import trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training configuration (configs/onestory.py:variant).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard summaries and samples.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv  # logs.run: no positional arguments
  compilation_cache.enable()
  distributed.initialize_from_env()
  if jax.process_count() > 1:
    logging.info("JAX process %d of %d; devices: %s", jax.process_index(), jax.process_count(), jax.devices())
  if not logs.VERBOSE.value:  # a failed save or read is reported in one line, not in orbax's hundreds of tracebacks
    logs.mute_abandoned_io()
  try:
    trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except preemption.Preempted as e:
    print(e, flush=True)
    sys.exit(preemption.EXIT_STATUS)
  except (checkpoints.SaveFailed, trainer.NonFinite) as e:
    logs.exit_with(e, 1, logs.VERBOSE.value)


if __name__ == "__main__":
  logs.run(main, bad_input=(locks.InUse, ValueError))  # bad input: the config, the workdir
