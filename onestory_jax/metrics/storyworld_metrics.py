r"""The StoryWorld narrative metrics: C-Cons, E-Cons and caption following.

The paper (arXiv 2512.07802, Sec. 5.1 and App. B) scores narrative consistency with DINOv2
similarities between YOLO-segmented persons (Character Consistency, C-Cons) and between segmented
backgrounds (Environment Consistency, E-Cons), over the shots that the benchmark annotates as
sharing a character or an environment; "Inter-shot Avg." is their mean. On StoryWorld the shots are
described by exact image analysis (:mod:`onestory_jax.metrics.shot_analysis`, whose docstring gives
the notation) and the descriptions are compared here. Every number comes from the generated frames
alone; the story annotations only say which shots share which character or environment, how many
characters each shot shows and where they move. docs/metrics.md states the same definitions with
their rationale.

Metrics (registered in this order; ``evaluate_story`` reports them under these names):

* ``character_consistency`` (C-Cons): mean over ALL shot pairs ``i < j`` that share at least one
  annotated character (not only neighbours). Each cluster is repeated ``multiplicity`` times (a
  cluster that holds two same-coloured characters stands for both). Cluster ``a`` of shot i and
  ``b`` of shot j have similarity ``S[a, b] = s(c_a, c_b) * sqrt(quality_a * quality_b) * (1 -
  shape_weight + shape_weight * shape_sim)`` with ``shape_sim = 1 - mean |grid_a - grid_b|`` (1 if
  either shape is unknown). The frames do not say which cluster is which character, so with ``n``
  shared characters the pair score is the best one-to-one matching of exactly ``min(n, rows, cols)``
  cluster pairs (Hungarian algorithm) summed and divided by ``n``: a shared character without a
  counterpart adds 0. A character that is not shared may stand in for a shared one, so the pair
  score is an upper bound when identities are swapped between characters of similar look. Clutter
  is charged: a shot whose count exceeds its ``n`` annotated characters has ``count_precision = n /
  count`` (else 1), and the pair score is multiplied by ``sqrt(count_precision_i *
  count_precision_j)``. Without it a mosaic of noise cells drawn from a few colours, what an
  undertrained model samples, offers a match for every character in every shot and scores near 1.
* ``environment_consistency`` (E-Cons): mean over ALL shot pairs annotated with the same environment
  of ``sqrt(bq_i * bq_j) * (signature_sim + layout_sim) / 2`` where ``bq`` is the background
  quality, ``signature_sim = (sum_a w_a max_b s(c_a, c_b) + sum_b w_b max_a s(c_a, c_b)) / 2``
  (symmetric soft recall of the two colour signatures) and ``layout_sim`` is the mean of ``s``
  between the two background images over the pixels valid in both (0 if there is none).
* ``inter_avg``: mean of C-Cons and E-Cons (of those defined): the paper's "Inter-shot Avg.".
* ``direction_accuracy``: share of the shots with at least one annotated character whose detected
  direction equals the annotated ``action``.
* ``count_accuracy``: share of all shots whose count equals the number of annotated characters.

A metric with nothing to average over is ``None`` (JSON ``null``). :func:`details` lists every pair
(``character_pairs``, ``environment_pairs``), every shot (``shots``) and their numbers
(``num_character_pairs``, ``num_environment_pairs``, ``num_direction_shots``, ``num_shots``).
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
from scipy import optimize

from onestory_jax.metrics import registry
from onestory_jax.metrics import shot_analysis
from onestory_jax.metrics.shot_analysis import MetricConfig
from onestory_jax.metrics.shot_analysis import ShotAnalysis

# ----------------------------------------------------------------------------- pair scores


def _best_matching(sim: np.ndarray, n: int) -> float:
  """Largest total of exactly ``min(n, rows, cols)`` one-to-one entries of ``sim`` [rows, cols]."""
  rows, cols = sim.shape
  n = min(n, rows, cols)
  if n == 0:
    return 0.0
  # Dummy columns let rows - n real rows go unmatched and dummy rows take cols - n real columns;
  # dummy-dummy pairs are forbidden, so exactly n real pairs are chosen.
  size = rows + cols - n
  cost = np.zeros((size, size))
  cost[:rows, :cols] = -sim
  cost[rows:, cols:] = 1e6
  r, c = optimize.linear_sum_assignment(cost)
  real = (r < rows) & (c < cols)
  return float(sim[r[real], c[real]].sum())


def character_pair_score(
    a: ShotAnalysis, b: ShotAnalysis, num_shared: int, cfg: MetricConfig = MetricConfig()
) -> float:
  """C-Cons of one pair of shots that share ``num_shared >= 1`` characters (module docstring)."""
  if num_shared < 1:
    raise ValueError(f"character_pair_score: num_shared must be >= 1, got {num_shared}")
  rows = [c for c in a.clusters for _ in range(c.multiplicity)]
  cols = [c for c in b.clusters for _ in range(c.multiplicity)]
  sim = np.zeros((len(rows), len(cols)))
  for i, ca in enumerate(rows):
    for j, cb in enumerate(cols):
      shape_sim = 1.0
      if ca.shape is not None and cb.shape is not None:
        shape_sim = 1.0 - float(np.abs(ca.shape - cb.shape).mean())
      sim[i, j] = (
          float(shot_analysis.colour_similarity(ca.centre, cb.centre, cfg.colour_sigma))
          * np.sqrt(ca.quality * cb.quality)
          * (1.0 - cfg.shape_weight + cfg.shape_weight * shape_sim)
      )
  return _best_matching(sim, num_shared) / num_shared


def count_precision(analysis: ShotAnalysis, num_characters: int) -> float:
  """``num_characters / count`` when the shot shows more entities than annotated, else 1.

  The clutter charge of C-Cons (module docstring): entities beyond the annotated characters are
  spurious, and any of them could stand in for a character in the matching.
  """
  if num_characters < 0:
    raise ValueError(f"count_precision: num_characters must be >= 0, got {num_characters}")
  if analysis.count <= num_characters:
    return 1.0
  return num_characters / analysis.count


def environment_pair_score(a: ShotAnalysis, b: ShotAnalysis, cfg: MetricConfig = MetricConfig()) -> float:
  """E-Cons of one pair of shots annotated with the same environment (module docstring)."""
  (ca, wa), (cb, wb) = a.background_signature, b.background_signature
  signature = 0.0
  if ca.shape[0] and cb.shape[0]:
    s = shot_analysis.colour_similarity(ca[:, None, :], cb[None, :, :], cfg.colour_sigma)
    signature = 0.5 * float((wa * s.max(1)).sum() + (wb * s.max(0)).sum())
  both = a.background_valid & b.background_valid
  layout = 0.0
  if both.any():
    layout = float(shot_analysis.colour_similarity(a.background[both], b.background[both], cfg.colour_sigma).mean())
  return float(np.sqrt(a.background_quality * b.background_quality) * 0.5 * (signature + layout))


# ----------------------------------------------------------------------------- per story


def _mean(values: Sequence[float]) -> float | None:
  return float(np.mean(values)) if len(values) else None


def count_precisions(ev: registry.StoryEval) -> list[float]:
  """:func:`count_precision` of every shot against its annotated characters."""
  return ev.cached(
      "count_precision",
      lambda: [count_precision(an, len(shot["characters"])) for shot, an in zip(ev.story["shots"], ev.analyses)],
  )


def character_pairs(ev: registry.StoryEval) -> list[dict]:
  """Every shot pair ``i < j`` that shares a character: ``{"shots", "shared", "score"}``."""

  def compute():
    shots, analyses, precision = ev.story["shots"], ev.analyses, count_precisions(ev)
    pairs = []
    for i, j in itertools.combinations(range(len(shots)), 2):
      shared = sorted(set(shots[i]["characters"]) & set(shots[j]["characters"]), key=str)
      if shared:
        score = character_pair_score(analyses[i], analyses[j], len(shared), ev.cfg) * float(
            np.sqrt(precision[i] * precision[j])
        )
        pairs.append({"shots": [i, j], "shared": shared, "score": score})
    return pairs

  return ev.cached("character_pairs", compute)


def environment_pairs(ev: registry.StoryEval) -> list[dict]:
  """Every shot pair ``i < j`` with the same environment: ``{"shots", "environment", "score"}``."""

  def compute():
    shots, analyses = ev.story["shots"], ev.analyses
    pairs = []
    for i, j in itertools.combinations(range(len(shots)), 2):
      if shots[i]["environment"] == shots[j]["environment"]:
        score = environment_pair_score(analyses[i], analyses[j], ev.cfg)
        pairs.append({"shots": [i, j], "environment": shots[i]["environment"], "score": score})
    return pairs

  return ev.cached("environment_pairs", compute)


def _direction_hits(ev: registry.StoryEval) -> list[float]:
  return [
      float(an.direction == shot["action"]) for shot, an in zip(ev.story["shots"], ev.analyses) if shot["characters"]
  ]


@registry.register_metric("character_consistency")
def character_consistency(ev: registry.StoryEval) -> float | None:
  """C-Cons: mean score of the shot pairs that share a character."""
  return _mean([p["score"] for p in character_pairs(ev)])


@registry.register_metric("environment_consistency")
def environment_consistency(ev: registry.StoryEval) -> float | None:
  """E-Cons: mean score of the shot pairs that share an environment."""
  return _mean([p["score"] for p in environment_pairs(ev)])


@registry.register_metric("inter_avg")
def inter_avg(ev: registry.StoryEval) -> float | None:
  """The paper's "Inter-shot Avg.": mean of C-Cons and E-Cons, of those defined."""
  return _mean([x for x in (character_consistency(ev), environment_consistency(ev)) if x is not None])


@registry.register_metric("direction_accuracy")
def direction_accuracy(ev: registry.StoryEval) -> float | None:
  """Share of the shots with characters whose detected direction is the annotated action."""
  return _mean(_direction_hits(ev))


@registry.register_metric("count_accuracy")
def count_accuracy(ev: registry.StoryEval) -> float | None:
  """Share of the shots whose count of entities is the number of annotated characters."""
  return _mean([float(an.count == len(shot["characters"])) for shot, an in zip(ev.story["shots"], ev.analyses)])


def details(ev: registry.StoryEval) -> dict:
  """The per-pair and per-shot records behind the metrics, and their numbers (JSON-serialisable)."""
  shots, precision = ev.story["shots"], count_precisions(ev)
  per_shot = []
  for i, (shot, an) in enumerate(zip(shots, ev.analyses)):
    per_shot.append(
        {
            "shot": i,
            "action": shot["action"],
            "detected_direction": an.direction,
            "displacement": [an.displacement[0], an.displacement[1]],
            "num_characters": len(shot["characters"]),
            "detected_count": an.count,
            "count_precision": precision[i],
            "num_colours": sum(c.quality >= 0.5 for c in an.clusters),
            "background_quality": an.background_quality,
        }
    )
  char_pairs, env_pairs = character_pairs(ev), environment_pairs(ev)
  return {
      "num_shots": len(shots),
      "num_character_pairs": len(char_pairs),
      "num_environment_pairs": len(env_pairs),
      "num_direction_shots": len(_direction_hits(ev)),
      "character_pairs": char_pairs,
      "environment_pairs": env_pairs,
      "shots": per_shot,
  }
