"""What a training data source provides, and the registry of sources by name.

The grain pipeline (:mod:`onestory_jax.data.pipeline`) draws 3-shot triplets from a
:class:`StorySource` and knows nothing else about the data. ``config.data.source`` names
the source; :func:`make_story_source` looks the name up in :data:`SOURCES`.

StoryWorld registers two sources (:mod:`onestory_jax.data.storyworld_sources`):
``'on_the_fly'`` (procedural stories rendered on demand) and ``'tfds'`` (a built
ArrayRecord split). A new source is a picklable class with the three members of
:class:`StorySource` and one registration::

  from onestory_jax.data import sources

  class MultiShotVideos:
    def __len__(self): ...
    def record(self, index): ...       # (story dict, shot index -> uint8 [T, H, W, 3])
    def pseudo_labels(self, story, memory_shots, target): ...  # float32 [len(memory_shots)]

  sources.register_source("multishot", lambda config: MultiShotVideos(config.data...))

and, for a module of this package, its name in ``SOURCE_MODULES`` below, so that looking
the name up imports it.

A source of precomputed training arrays (``'multishot'``: latents, caption embeddings and
per-frame pseudo-labels of built records, :mod:`onestory_jax.data.multishot_sources`) registers
its own batch layout too (``register_source(name, factory, example_spec=fn)``), and its instances
have a ``triplet_sampler(spec, tokenizer, layout)`` member that replaces the pixel
``TripletSampler``; its ``record`` reader then returns a shot's stored latents.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import ml_collections
import numpy as np

ShotReader = Callable[[int], np.ndarray]
"""Shot index of a story -> its frames, uint8 [T, H, W, 3] (T = config.data.frames_per_shot,
H x W = config.data.height x width)."""


@runtime_checkable
class StorySource(Protocol):
  """A random-access collection of multi-shot stories (a training data source).

  Instances are pickled into grain's worker processes, which are spawned: a source must be
  picklable and importable by module path, and should open files lazily (see
  ``storyworld_tfds.StoryWorldSource``).
  """

  def __len__(self) -> int:
    """Number of stories; stories are indexed 0 .. len - 1. Cross-video insertion needs >= 2."""

  def record(self, index: int) -> tuple[dict[str, Any], ShotReader]:
    """Story ``index``: its record and a reader of its shots' frames.

    Returns:
      ``(story, read_shot)``. ``story`` is a dict with at least ``"shots"``: a list of
      >= 2 shots in story order, each a dict with a ``"caption"`` (str); any further
      fields are the source's annotations (StoryWorld's are described in
      :mod:`onestory_jax.data.storyworld`), passed back to :meth:`pseudo_labels`.
      ``read_shot(i)`` returns shot ``i``'s frames, uint8 [T, H, W, 3].
    """

  def pseudo_labels(self, story: dict[str, Any], memory_shots: Sequence[int], target: int) -> np.ndarray:
    """Frame Selection pseudo-labels (paper App. A.2, Eq. 11) of memory shots for a target.

    Args:
      story: a record returned by :meth:`record`.
      memory_shots: indices (into ``story["shots"]``) of the memory shots, each < ``target``.
      target: index of the target shot.

    Returns:
      float32 [len(memory_shots)]: one label per memory shot, which every frame of that shot
      carries (about 1: the shot shows what the target needs; about 0: it does not). The
      paper's real-data labels are the mean DINOv2/CLIP cosine similarity to the target
      shot's mean embedding; StoryWorld's come from its annotations
      (:func:`onestory_jax.data.storyworld.pseudo_labels`). The synthetic shots of shot
      inflation get fixed labels from the pipeline, not from here.
    """


SourceFactory = Callable[[ml_collections.ConfigDict], StorySource]
"""The experiment config (reads config.seed and config.data) -> a training story source."""

SOURCES: dict[str, SourceFactory] = {}
"""``config.data.source`` name -> factory of the source. Filled by :func:`register_source`."""

EXAMPLE_SPECS: dict[str, Callable[[ml_collections.ConfigDict], dict[str, tuple[tuple[int, ...], Any]]]] = {}
"""``config.data.source`` name -> the sample layout of a source of precomputed arrays (see the module docstring)."""

SOURCE_MODULES = ("onestory_jax.data.storyworld_sources", "onestory_jax.data.multishot_sources")
"""Modules that register the sources of this package; imported on the first lookup."""


def register_source(name: str, factory: SourceFactory, example_spec: Callable | None = None) -> None:
  """Makes ``config.data.source = name`` build its story source with ``factory(config)``.

  ``example_spec(config)``, for a source of precomputed arrays, gives its sample layout (replacing
  :func:`onestory_jax.data.pipeline.example_spec`'s pixel one). Registering the same factory twice is a no-op;
  another factory under a taken name raises.
  """
  if SOURCES.get(name, factory) is not factory:
    raise ValueError(f"register_source: a different source is already registered as {name!r}")
  SOURCES[name] = factory
  if example_spec is not None:
    EXAMPLE_SPECS[name] = example_spec


def source_example_spec(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], Any]] | None:
  """The sample layout that ``config.data.source`` registered, or None for a pixel source (the default layout)."""
  available_sources()
  spec = EXAMPLE_SPECS.get(config.data.source)
  return None if spec is None else spec(config)


def available_sources() -> tuple[str, ...]:
  """The registered source names, sorted."""
  for module in SOURCE_MODULES:
    importlib.import_module(module)
  return tuple(sorted(SOURCES))


def make_story_source(config: ml_collections.ConfigDict) -> StorySource:
  """The story source that ``config.data.source`` names (see :data:`SOURCES`)."""
  names = available_sources()
  name = config.data.source
  if name not in SOURCES:
    raise ValueError(f"config.data.source must be one of {names}, got {name!r}")
  source = SOURCES[name](config)
  if not isinstance(source, StorySource):
    raise TypeError(
        f"the factory of config.data.source={name!r} returned "
        f"{type(source).__name__}, which lacks a StorySource member "
        "(__len__, record, pseudo_labels)"
    )
  return source
