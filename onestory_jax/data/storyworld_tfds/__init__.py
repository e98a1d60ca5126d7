"""TFDS builder `storyworld` (ArrayRecord) and its TF-free random-access reader."""

from onestory_jax.data.storyworld_tfds.storyworld_dataset_builder import Builder
from onestory_jax.data.storyworld_tfds.storyworld_dataset_builder import build
from onestory_jax.data.storyworld_tfds.storyworld_dataset_builder import SPLIT_BASE_SEEDS
from onestory_jax.data.storyworld_tfds.storyworld_dataset_builder import StoryWorldBuilderConfig
from onestory_jax.data.storyworld_tfds.storyworld_dataset_builder import StoryWorldSource
from onestory_jax.data.storyworld_tfds.storyworld_dataset_builder import storyworld_data_source

__all__ = [
    "Builder",
    "SPLIT_BASE_SEEDS",
    "StoryWorldBuilderConfig",
    "StoryWorldSource",
    "build",
    "storyworld_data_source",
]
