"""Builds the StoryWorld TFDS dataset (ArrayRecord).

python -m onestory_jax.data.storyworld_tfds --data_dir=/data/tfds [--config=demo|tiny]
"""

from absl import flags

from onestory_jax import logs
from onestory_jax.data.storyworld_tfds import storyworld_dataset_builder

_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir to build into.")
_CONFIG = flags.DEFINE_string("config", "demo", "Builder config (demo | tiny).")
flags.mark_flags_as_required(["data_dir"])


def main(argv):
  del argv
  storyworld_dataset_builder.build(_DATA_DIR.value, _CONFIG.value)
  print(f"built StoryWorld ({_CONFIG.value}) into {_DATA_DIR.value}")


if __name__ == "__main__":
  logs.run(main)
