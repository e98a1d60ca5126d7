"""The metric registry: metric name -> function of one story under evaluation.

A metric is a function ``metric(ev: StoryEval) -> float | None`` that scores one generated story
(``None`` when the story offers nothing to score, e.g. no pair of shots shares a character). It
reads the story's annotations (``ev.story``), its generated frames (``ev.frames``, one uint8
``[T, H, W, 3]`` array per shot) and whatever shared, per-story work it needs through the
context: ``ev.analyses`` (one :class:`~onestory_jax.metrics.shot_analysis.ShotAnalysis` per shot,
computed on first use) or ``ev.cached(key, compute)`` for a metric's own intermediate results. A
per-shot metric averages over the shots itself.

:func:`onestory_jax.evaluate.evaluate_story` reports every registered metric under its name, in
registration order, and ``memory_ablation`` averages each of them per memory mode. Register with::

  @registry.register_metric("my_metric")
  def my_metric(ev: registry.StoryEval) -> float | None:
    ...

(:mod:`onestory_jax.metrics` imports the modules that register the built-in metrics.)
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import numpy as np

from onestory_jax.metrics import shot_analysis


class StoryEval:
  """One generated story under evaluation: what every metric reads.

  Attributes:
    story: the story dict (the annotations; the StoryWorld metrics read the shots' ``characters``,
      ``environment`` and ``action``).
    frames: one uint8 ``[T, H, W, 3]`` array per story shot (the inputs are checked by the caller).
    cfg: the thresholds of the StoryWorld analysis.
  """

  def __init__(
      self, story: dict, frames: Sequence[np.ndarray], cfg: shot_analysis.MetricConfig = shot_analysis.MetricConfig()
  ):
    self.story = story
    self.frames = frames
    self.cfg = cfg
    self._cache: dict[str, Any] = {}

  @functools.cached_property
  def analyses(self) -> list[shot_analysis.ShotAnalysis]:
    """``analyze_shot`` of every shot (computed once, on first use)."""
    return [shot_analysis.analyze_shot(f, self.cfg) for f in self.frames]

  def cached(self, key: str, compute: Callable[[], Any]) -> Any:
    """``compute()`` the first time ``key`` is asked for on this story, then its stored result."""
    if key not in self._cache:
      self._cache[key] = compute()
    return self._cache[key]


Metric = Callable[[StoryEval], float | None]

METRICS: dict[str, Metric] = {}
"""Metric name -> metric, in registration order (the order of the reports)."""


def register_metric(name: str, metric: Metric | None = None):
  """Registers ``metric`` under ``name``; without ``metric``, a decorator that does.

  Registering the same function twice is a no-op; another function under a taken name raises.
  """
  if metric is None:
    return lambda fn: register_metric(name, fn)
  if METRICS.get(name, metric) is not metric:
    raise ValueError(f"register_metric: a different metric is already registered as {name!r}")
  METRICS[name] = metric
  return metric


def names() -> tuple[str, ...]:
  """The registered metric names, in registration order."""
  return tuple(METRICS)


def get(name: str) -> Metric:
  """The metric registered as ``name``."""
  if name not in METRICS:
    raise ValueError(f"unknown metric {name!r}; registered: {names()}")
  return METRICS[name]


def compute(ev: StoryEval) -> dict[str, float | None]:
  """Every registered metric of ``ev``, by name, in registration order."""
  return {name: metric(ev) for name, metric in METRICS.items()}
