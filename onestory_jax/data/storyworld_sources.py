"""StoryWorld's training story sources: ``config.data.source`` 'on_the_fly' and 'tfds'.

* ``'on_the_fly'``: story k is ``generate_story(story_seed(config.seed, k))`` for k below
  ``config.data.num_train_stories``, its shots rendered on demand;
* ``'tfds'``: the train split of the StoryWorld ArrayRecord build in
  ``config.data.tfds_data_dir`` (builder config ``config.data.tfds_config``, or the only one
  built), whose frame size must match config.data.

Both take pseudo-labels from the story annotations (:func:`storyworld.pseudo_labels`).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import ml_collections
import numpy as np

from onestory_jax.data import sources
from onestory_jax.data import storyworld


class _AnnotatedStories:
  """Pseudo-labels from StoryWorld's annotations (shared characters and environment)."""

  def pseudo_labels(self, story: dict[str, Any], memory_shots: Sequence[int], target: int) -> np.ndarray:
    return storyworld.pseudo_labels(story, memory_shots, target)


class ProceduralStories(_AnnotatedStories):
  """Story index -> procedurally generated story; shots rendered on demand."""

  def __init__(self, cfg: storyworld.StoryWorldConfig, base_seed: int, num_stories: int):
    self.cfg = cfg
    self.base_seed = int(base_seed)
    self.num_stories = int(num_stories)

  def __len__(self) -> int:
    return self.num_stories

  def record(self, index: int) -> tuple[dict[str, Any], sources.ShotReader]:
    story = storyworld.generate_story(storyworld.story_seed(self.base_seed, index), cfg=self.cfg)
    return story, functools.partial(storyworld.render_shot, story)


class TfdsStories(_AnnotatedStories):
  """Story index -> record of a built StoryWorld TFDS split."""

  def __init__(self, source: Any):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def record(self, index: int) -> tuple[dict[str, Any], sources.ShotReader]:
    item = self.source[index]
    return item["story"], item["frames"].__getitem__


def on_the_fly_source(config: ml_collections.ConfigDict) -> ProceduralStories:
  """``config.data.source = 'on_the_fly'``."""
  return ProceduralStories(
      storyworld.StoryWorldConfig.from_config(config.data), int(config.seed), int(config.data.num_train_stories)
  )


def tfds_source(config: ml_collections.ConfigDict) -> TfdsStories:
  """``config.data.source = 'tfds'``."""
  data = config.data
  story_cfg = storyworld.StoryWorldConfig.from_config(data)
  if not data.tfds_data_dir:
    raise ValueError("config.data.tfds_data_dir must be set when config.data.source " "is 'tfds'")
  from onestory_jax.data import storyworld_tfds  # pylint: disable=g-import-not-at-top

  source = storyworld_tfds.storyworld_data_source(data.tfds_data_dir, "train", data.tfds_config or None)
  shape = source.features_shape[1:]
  want = (story_cfg.frames_per_shot, story_cfg.height, story_cfg.width, 3)
  if shape != want:
    raise ValueError(
        f"StoryWorld TFDS data in {data.tfds_data_dir!r} has shots of shape "
        f"{shape}, but config.data asks for (frames_per_shot, height, width, "
        f"3) = {want}"
    )
  return TfdsStories(source)


sources.register_source("on_the_fly", on_the_fly_source)
sources.register_source("tfds", tfds_source)
