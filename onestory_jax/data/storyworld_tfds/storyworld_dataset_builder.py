r"""TFDS builder for StoryWorld, written as ArrayRecord and readable without TensorFlow.

Story k of split s is ``generate_story(story_seed(SPLIT_BASE_SEEDS[s], k), cfg=...)``
(so with base seed 0 the train split holds the same stories as the on-the-fly
pipeline with ``config.seed = 0``). Every record stores only ``tfds.features.Tensor``
features, which decode with numpy alone:

* ``frames``     uint8 [max_shots, T, H, W, 3], zero-padded after ``num_shots`` shots;
* ``num_shots``  int32 [];
* ``seed``       int32 [] (the story seed);
* ``index``      int32 [] (k);
* ``story_json`` uint8 [None] (UTF-8 JSON of the story dict).

Build (configs: ``demo`` 32x32x8, 2000/200 stories; ``tiny`` 16x16x4, 6/2 stories)::

  python -m onestory_jax.data.storyworld_tfds --data_dir=/data/tfds --config=demo

Read: ``storyworld_data_source(data_dir, 'train')[k] -> {'story', 'frames', 'index'}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from onestory_jax.data import storyworld

NAME = "storyworld"
SPLIT_BASE_SEEDS = {"train": 0, "validation": 1_000_001}


@dataclasses.dataclass(eq=False)
class StoryWorldBuilderConfig(tfds.core.BuilderConfig):
  """Story size and split sizes of one StoryWorld build."""

  height: int = 32
  width: int = 32
  frames_per_shot: int = 8
  min_shots: int = 2
  max_shots: int = 6
  num_train: int = 2000
  num_validation: int = 200

  def story_config(self) -> storyworld.StoryWorldConfig:
    return storyworld.StoryWorldConfig.from_config(self)


class Builder(tfds.core.GeneratorBasedBuilder):
  """StoryWorld multi-shot stories (procedural; nothing is downloaded)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      StoryWorldBuilderConfig(name="demo", description="32x32, 8 frames per shot."),
      StoryWorldBuilderConfig(
          name="tiny",
          description="16x16, 4 frames, for tests.",
          height=16,
          width=16,
          frames_per_shot=4,
          max_shots=4,
          num_train=6,
          num_validation=2,
      ),
  ]
  DEFAULT_CONFIG_NAME = "demo"
  # tfds 4.9.10 derives `code_path` through the `importlib_resources` backport, which
  # is not installed on Python 3.11; the answer is simply this file.
  code_path = epath.Path(__file__)

  def __init__(self, *, file_format: str | None = None, **kwargs):
    # ArrayRecord by default: random access, and no TensorFlow at read time.
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    frames_shape = (cfg.max_shots, cfg.frames_per_shot, cfg.height, cfg.width, 3)
    features = tfds.features.FeaturesDict(
        {
            "frames": tfds.features.Tensor(shape=frames_shape, dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB),
            "num_shots": tfds.features.Tensor(shape=(), dtype=np.int32),
            "seed": tfds.features.Tensor(shape=(), dtype=np.int32),
            "index": tfds.features.Tensor(shape=(), dtype=np.int32),
            "story_json": tfds.features.Tensor(shape=(None,), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES),
        }
    )
    return self.dataset_info_from_configs(
        description="StoryWorld: procedural multi-shot stories with referential captions.",
        features=features,
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download.
    cfg = self.builder_config
    return {
        "train": self._generate_examples(SPLIT_BASE_SEEDS["train"], cfg.num_train),
        "validation": self._generate_examples(SPLIT_BASE_SEEDS["validation"], cfg.num_validation),
    }

  def _generate_examples(self, base_seed: int, count: int) -> Iterator[tuple[int, dict]]:
    cfg = self.builder_config
    story_cfg = cfg.story_config()
    for k in range(count):
      seed = storyworld.story_seed(base_seed, k)
      story = storyworld.generate_story(seed, cfg=story_cfg)
      frames = np.zeros((cfg.max_shots, cfg.frames_per_shot, cfg.height, cfg.width, 3), np.uint8)
      for i, shot in enumerate(storyworld.render_story(story)):
        frames[i] = shot
      payload = np.frombuffer(json.dumps(story).encode("utf-8"), dtype=np.uint8)
      yield k, {
          "frames": frames,
          "num_shots": np.int32(len(story["shots"])),
          "seed": np.int32(seed),
          "index": np.int32(k),
          "story_json": payload,
      }


def _decode(record: dict[str, Any]) -> dict[str, Any]:
  num_shots = int(record["num_shots"])
  story = json.loads(np.asarray(record["story_json"], np.uint8).tobytes().decode("utf-8"))
  return {"story": story, "frames": np.asarray(record["frames"][:num_shots]), "index": int(record["index"])}


class StoryWorldSource:
  """Random access to a built StoryWorld split: item k -> {'story', 'frames', 'index'}.

  ``frames`` is uint8 [num_shots, T, H, W, 3]. Picklable (grain workers reopen the
  ArrayRecord files lazily).
  """

  def __init__(self, data_dir: str, split: str, config_name: str):
    self.data_dir = os.fspath(data_dir)
    self.split = split
    self.config_name = config_name
    self._source = None

  def _open(self):
    if self._source is None:
      self._source = tfds.data_source(
          f"{NAME}/{self.config_name}", split=self.split, data_dir=self.data_dir, download=False
      )
    return self._source

  @property
  def features_shape(self) -> tuple[int, ...]:
    """[max_shots, T, H, W, 3] of the stored frames."""
    return tuple(self._open().dataset_info.features["frames"].shape)

  def __len__(self) -> int:
    return len(self._open())

  def __getitem__(self, index: int) -> dict[str, Any]:
    n = len(self)
    if not -n <= int(index) < n:
      raise IndexError(f"StoryWorld {self.split} index {index} out of range [0, {n})")
    return _decode(self._open()[int(index) % n])

  def __getstate__(self) -> dict[str, Any]:
    return {"data_dir": self.data_dir, "split": self.split, "config_name": self.config_name}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state["data_dir"], state["split"], state["config_name"])


def storyworld_data_source(data_dir: str, split: str, config_name: str | None = None) -> StoryWorldSource:
  """Opens a built StoryWorld split for random access (no TensorFlow needed).

  Args:
    data_dir: the TFDS data dir the dataset was built into.
    split: 'train' or 'validation'.
    config_name: builder config ('demo', 'tiny'); None picks the only one built.
  """
  if split not in SPLIT_BASE_SEEDS:
    raise ValueError(f"split must be one of {tuple(SPLIT_BASE_SEEDS)}, got {split!r}")
  root = os.path.join(os.fspath(data_dir), NAME)
  built = sorted(
      d
      for d in (os.listdir(root) if os.path.isdir(root) else [])
      if not d.startswith(".") and os.path.isdir(os.path.join(root, d))
  )
  if config_name is None:
    if len(built) != 1:
      raise ValueError(
          f"tfds data_dir {data_dir!r}: expected exactly one built StoryWorld "
          f"config under {root!r}, found {built}; pass config_name"
      )
    config_name = built[0]
  if config_name not in built:
    raise ValueError(
        f"tfds data_dir {data_dir!r} has no built StoryWorld config "
        f"{config_name!r} (found {built}); build it with `python -m "
        "onestory_jax.data.storyworld_tfds "
        f"--data_dir={data_dir} --config={config_name}`"
    )
  source = StoryWorldSource(data_dir, split, config_name)
  len(source)  # Opens it: fails early on a missing split.
  return source


def build(data_dir: str, config_name: str = "demo") -> None:
  """Builds (downloads nothing) the StoryWorld dataset into `data_dir`."""
  Builder(data_dir=data_dir, config=config_name).download_and_prepare()
