r"""The paper's ablations as commands (Table 2a, Table 2b, Fig. 6): train each variant, score it, print the table.

  python -m onestory_jax.ablation --table=2a --root=workdirs/ablation [--config=configs/onestory.py:demo] \
      [--steps=2000] [--batch_size=32] [--init_params=onestory_jax/assets/demo_checkpoint] \
      [--patterns=recall,consistency,compose] [--num_stories=48] [--first_seed=100] [--variants=a,b]

Every variant is a config change of one base config, fine-tuned from the same parameters (``--init_params``,
default the shipped demo checkpoint) with the same steps, batch and data order, then sampled with its own memory
strategy on the same held-out StoryWorld stories (seeds ``first_seed ..``; training draws its stories from hashed
seeds, so these are stories no training run saw) and scored with :mod:`onestory_jax.evaluate`:

* ``2a`` (model design, one latent frame of context for every row): the last frame only (no Adaptive Conditioner,
  no Frame Selection: ``last_frame``, one kernel at the DiT's patch); + Adaptive Conditioner (the most recent frames
  at adaptive kernels); + Frame Selection (its best frame at the DiT's patch); both (OneStory).
* ``2b`` (training strategies): neither shot inflation nor decoupled conditioning; + shot inflation; + both.
* ``fig6`` (selection schemes, each trained with its own): uniform, most recent, Frame Selection.

Re-running the command resumes: a finished training is not redone (the trainer resumes from its checkpoints), an
export and a scored pattern are reused (``ROOT/VARIANT/export``, ``ROOT/VARIANT/scores_*.json``). The table shows
each variant's mean over the stories and its paired difference from the last row (the full model), with the
standard error of that difference, per pattern.
"""

from __future__ import annotations

import dataclasses
import json
import os

from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags
import numpy as np

from onestory_jax import checkpoints
from onestory_jax import compilation_cache
from onestory_jax import logs
from onestory_jax import memory_ablation
from onestory_jax import video_io


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  label: str
  overrides: dict


_POINT = ((1, 1, 1),)  # one kernel at the DiT's own patch: a single frame fills one latent frame of tokens
_ADAPTIVE = ((1, 2, 2), (1, 4, 4), (1, 8, 8))
TABLES = {
    "2a": (
        Variant("last_frame", "last frame only", {"selection.strategy": "last_frame", "conditioner.kernels": _POINT}),
        Variant("ac", "+ Adaptive Conditioner", {"selection.strategy": "recent", "conditioner.kernels": _ADAPTIVE}),
        Variant("fs", "+ Frame Selection", {"selection.k_sel": 1, "conditioner.kernels": _POINT}),
        Variant("ac_fs", "+ both (OneStory)", {"conditioner.kernels": _ADAPTIVE}),
    ),
    "2b": (
        Variant("plain", "no SI, no DC", {"data.p_inflate": 0.0, "warmup_fraction_dc": 0.0}),
        Variant("si", "+ shot inflation", {"warmup_fraction_dc": 0.0}),
        Variant("si_dc", "+ both (OneStory)", {}),
    ),
    "fig6": (
        Variant("uniform", "uniform", {"selection.strategy": "uniform"}),
        Variant("recent", "most recent", {"selection.strategy": "recent"}),
        Variant("onestory", "Frame Selection", {}),
    ),
}
COLUMNS = (
    ("character_consistency", "C-Cons"),
    ("environment_consistency", "E-Cons"),
    ("direction_accuracy", "direction"),
)


def variant_config(base: ml_collections.ConfigDict, variant: Variant, steps: int, batch: int, init: str):
  """The base config with the variant's changes and the shared fine-tuning settings."""
  c = ml_collections.ConfigDict(base.to_dict())
  overrides = {"num_train_steps": steps, "data.batch_size": batch, "init_params": init, **variant.overrides}
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise ValueError(f"ablation variant {variant.name}: the config has no field {key!r}")
    node[leaf] = value
  return c


def _paired(values: list, reference: list) -> tuple[float | None, float | None]:
  d = np.asarray([v - r for v, r in zip(values, reference) if v is not None and r is not None], np.float64)
  if d.size < 2:
    return (float(d.mean()) if d.size else None), None
  return float(d.mean()), float(d.std(ddof=1) / np.sqrt(d.size))


def train_and_score(
    variant: Variant,
    config: ml_collections.ConfigDict,
    root: str,
    patterns: list[str],
    num_stories: int,
    first_seed: int,
    sample_steps: int | None = None,
) -> dict:
  """Trains (or resumes) one variant, exports it, and scores it on every pattern; returns {pattern: scores}."""
  from onestory_jax import trainer  # pylint: disable=g-import-not-at-top  (TensorFlow, through clu)

  workdir = os.path.join(root, variant.name)
  export = os.path.join(workdir, "export")
  step_file = os.path.join(export, "step.txt")
  done = os.path.exists(step_file) and int(open(step_file).read().split()[0]) >= config.num_train_steps
  if not done:
    logging.info(
        "ablation: training %s (%s) for %d steps in %s", variant.name, variant.label, config.num_train_steps, workdir
    )
    trainer.train_and_evaluate(config, workdir)
    checkpoints.export_params(workdir, export)
  strategy = config.selection.get("strategy", "onestory")
  out = {}
  for pattern in patterns:
    path = os.path.join(workdir, f"scores_{pattern}_{first_seed}_{num_stories}.json")
    if os.path.exists(path):
      out[pattern] = video_io.read_json_object(path)
      continue
    logging.info("ablation: scoring %s on %d %s stories", variant.name, num_stories, pattern)
    scores = memory_ablation.run(
        export, pattern, num_stories, None, first_seed, memory=(strategy,), steps=sample_steps, progress=True
    )
    video_io.atomic_write_json(path, scores)
    out[pattern] = scores
  return out


def table(variants: list[Variant], scores: dict[str, dict], patterns: list[str]) -> str:
  """The markdown table: per pattern and column, each variant's mean and its paired difference from the last row."""
  ref = variants[-1]
  lines = []
  for pattern in patterns:
    lines.append(f"\n{pattern} stories (difference from '{ref.label}', paired, ± standard error):\n")
    lines.append("| variant | " + " | ".join(name for _, name in COLUMNS) + " | top-1 hit |")
    lines.append("|---|" + "---|" * (len(COLUMNS) + 1))
    for v in variants:
      s = scores[v.name][pattern]
      r = scores[ref.name][pattern]
      (mode,) = s["memory"]
      (ref_mode,) = r["memory"]
      cells = []
      for key, _ in COLUMNS:
        mean = s[mode].get(key)
        diff, se = _paired(s["per_story"][mode][key], r["per_story"][ref_mode][key])
        cell = "n/a" if mean is None else f"{mean:.3f}"
        if v is not ref and diff is not None:
          cell += f" ({diff:+.3f}" + (f" ± {se:.3f})" if se is not None else ")")
        cells.append(cell)
      hit = s["top1_character_hit"].get(mode)
      cells.append("n/a" if hit is None else f"{hit:.2f}")
      lines.append(f"| {v.label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _define_flags() -> None:
  """The command's flags (defined only when it runs, so that importing this module defines none)."""
  flags.DEFINE_enum("table", None, list(TABLES), "Which ablation.")
  flags.DEFINE_string("root", None, "Directory of the variants' workdirs.")
  config_flags.DEFINE_config_file("config", "configs/onestory.py:demo", "Base config.", lock_config=False)
  flags.DEFINE_integer("steps", 2000, "Training steps of every variant.")
  flags.DEFINE_integer("batch_size", 32, "Global batch of every variant.")
  flags.DEFINE_string("init_params", checkpoints.DEMO_CHECKPOINT, "Exported parameters every variant starts from.")
  flags.DEFINE_list("patterns", ["recall", "consistency", "compose"], "StoryWorld patterns to score.")
  flags.DEFINE_integer("num_stories", 48, "Held-out stories per pattern.")
  flags.DEFINE_integer("first_seed", 100, "First held-out story seed.")
  flags.DEFINE_list("variants", None, "Only these variants of the table (default: all).")
  flags.DEFINE_integer("sample_steps", None, "Sampler steps (default: the config's sample.steps).")


def main(argv):
  del argv
  f = flags.FLAGS
  if not f.table or not f.root:
    raise ValueError("--table and --root are required")
  compilation_cache.enable()
  variants = list(TABLES[f.table])
  if f.variants:
    unknown = sorted(set(f.variants) - {v.name for v in variants})
    if unknown:
      raise ValueError(f"--variants: {unknown} are not in table {f.table} ({[v.name for v in variants]})")
    variants = [v for v in variants if v.name in f.variants]
  scores = {}
  for v in variants:
    config = variant_config(f.config, v, f.steps, f.batch_size, f.init_params)
    scores[v.name] = train_and_score(v, config, f.root, f.patterns, f.num_stories, f.first_seed, f.sample_steps)
  print(
      f"Table {f.table}: {f.steps} steps at batch {f.batch_size} from {f.init_params}; "
      f"{f.num_stories} held-out stories per pattern from seed {f.first_seed}"
  )
  print(table(variants, scores, f.patterns))


if __name__ == "__main__":
  _define_flags()
  logs.run(main)
