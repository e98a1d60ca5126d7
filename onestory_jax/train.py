r"""Trains OneStory.

  python -m onestory_jax.train --config=configs/onestory.py:demo --workdir=workdirs/demo \
      [--config.num_train_steps=N ...]

Re-running the same command resumes from the latest checkpoint in ``--workdir``.
"""
from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from onestory_jax import logs
from onestory_jax import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training configuration (configs/onestory.py:variant).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard summaries and samples.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logs.quiet_libraries()
  if _multi_host():
    jax.distributed.initialize()
  logging.info("JAX devices: %s", jax.devices())
  trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


def _multi_host() -> bool:
  import os  # pylint: disable=g-import-not-at-top
  return any(k in os.environ for k in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID"))


if __name__ == "__main__":
  app.run(main)
