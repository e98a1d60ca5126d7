r"""Memory strategies compared on StoryWorld: the demo's headline comparison.

  python -m onestory_jax.memory_ablation [--workdir=DIR] --pattern=recall --num_stories=16 [--first_seed=S] \
      [--memory=onestory,none,last_frame,recent,uniform,keyframes] [--out=DIR] [--steps=N] [--shift=S] [--guidance=G] \
      [--memory_guidance=G_M[,G_M...]]

For each of ``num_stories`` StoryWorld stories of ``pattern`` (seeds 0, 1, ...), generates every shot once per memory
strategy (:mod:`onestory_jax.memory_strategies`; default OneStory's Frame Selection and no memory) with the same
model and seeds, every strategy under the same context-token budget, and scores each with
:mod:`onestory_jax.evaluate`. Prints the per-mode means of every registered metric
(:mod:`onestory_jax.metrics`) as JSON, how often each strategy's best-ranked frame comes from an earlier shot that
shares a character with the new shot, the paired per-story gain in character consistency of the first strategy
over each other one (mean, standard error, and how many stories gain or lose), the character consistency of
shot pairs grouped by the later shot of the pair (how well memory carries over longer stories), and, for scale,
the character consistency of the same stories' ground truth and of the ground truth with every returning
character recoloured at random (of any colour, or of its own colour name). Without ``--workdir`` the shipped
demo checkpoint is used.

``--memory_guidance`` with several scales compares each strategy at each scale (modes named ``onestory g_m=1.5``,
...; ``none`` has no memory to guide by and runs once), all paired with the first mode.
"""

from __future__ import annotations

import copy
import json
import os

from absl import flags
import numpy as np

from onestory_jax import compilation_cache
from onestory_jax import evaluate
from onestory_jax import logs
from onestory_jax import memory_strategies
from onestory_jax import metrics
from onestory_jax import pipeline
from onestory_jax import story as story_lib
from onestory_jax.data import storyworld

METRICS = metrics.names()  # every registered metric, averaged per memory mode
PER_STORY = ("character_consistency", "environment_consistency", "direction_accuracy")  # kept story by story


def selection_top1_hit(story: dict, shot: int, info: dict, frames_per_shot: int) -> bool | None:
  """Whether Frame Selection's best frame for ``shot`` lies in an earlier shot that shares one of its characters.

  ``None`` when no earlier shot shares a character (nothing to recall), so such shots do not count.
  """
  shots = story["shots"]
  wanted = set(shots[shot]["characters"])
  if not any(wanted & set(shots[k]["characters"]) for k in range(shot)):
    return None
  if not bool(info["valid"][0]):
    return False
  source = int(info["indices"][0]) // frames_per_shot
  return bool(wanted & set(shots[source]["characters"]))


def recolour_returning_characters(story: dict, rng: np.random.Generator, same_name: bool) -> list[np.ndarray]:
  """Ground-truth frames of ``story`` in which every returning character is redrawn in a random colour.

  Each shot after a character's first gets a fresh colour, drawn as StoryWorld draws them
  (:func:`storyworld.character_rgb`), of any hue, or with ``same_name`` a hue of the character's own colour name. This is what a model can do
  at best from the caption alone (the colour name, when the caption gives it), a floor for memory to beat.
  """
  frames, seen = [], set()
  for j, shot in enumerate(story["shots"]):
    redrawn = copy.deepcopy(story)
    for c in shot["characters"]:
      if c in seen:
        ch = redrawn["characters"][c]
        hue = float(rng.random())
        while same_name and storyworld.hue_name(hue) != ch["color_name"]:
          hue = float(rng.random())
        ch["color"] = storyworld.character_rgb(rng, hue)
    seen.update(shot["characters"])
    frames.append(storyworld.render_shot(redrawn, j))
  return frames


def reference_scores(stories: list[dict], seed: int = 0) -> dict:
  """Mean character consistency of references on ``stories``, no model involved: the ground-truth frames, and the
  ground truth with returning characters recoloured at random (:func:`recolour_returning_characters`), of any
  colour and of the same colour name."""
  rng = np.random.default_rng(seed)
  scores = {"ground_truth": [], "random_colour": [], "random_colour_same_name": []}
  for s in stories:
    for name, frames in (
        ("ground_truth", storyworld.render_story(s)),
        ("random_colour", recolour_returning_characters(s, rng, same_name=False)),
        ("random_colour_same_name", recolour_returning_characters(s, rng, same_name=True)),
    ):
      value = evaluate.evaluate_story(s, frames).get("character_consistency")
      if value is not None:
        scores[name].append(float(value))
  return {k: float(np.mean(v)) if v else None for k, v in scores.items()}


def _paired(first: list, other: list) -> dict | None:
  """Per-story ``first - other`` (same stories and seeds): mean, standard error, stories that gain and lose."""
  diffs = np.asarray([f - o for f, o in zip(first, other) if f is not None and o is not None])
  if not diffs.size:
    return None
  return {
      "stories": int(diffs.size),
      "mean": float(diffs.mean()),
      "standard_error": float(diffs.std(ddof=1) / np.sqrt(diffs.size)) if diffs.size > 1 else None,
      "stories_better": int(np.sum(diffs > 0)),
      "stories_worse": int(np.sum(diffs < 0)),
  }


def run(
    workdir: str | None,
    pattern: str,
    num_stories: int,
    out: str | None,
    first_seed: int = 0,
    *,
    memory: tuple[str, ...] = ("onestory", "none"),
    steps: int | None = None,
    shift: float | None = None,
    guidance: float | None = None,
    memory_guidance: tuple[float, ...] | None = None,
    progress: bool = False,
) -> dict:
  """Runs the comparison (with a progress bar if ``progress``); ``memory`` lists the strategies
  (:mod:`onestory_jax.memory_strategies`), and ``memory_guidance`` the memory guidance scales to run each at; the
  first mode is compared with each other one. ``steps`` / ``shift`` / ``guidance`` / ``memory_guidance`` default to
  the checkpoint config's ``sample`` fields."""
  strategies = tuple(dict.fromkeys(memory_strategies.canonical(m) for m in memory))
  scales = tuple(dict.fromkeys(float(g) for g in memory_guidance)) if memory_guidance else (None,)
  pipe = pipeline.OneStoryPipeline.from_pretrained(
      workdir, steps=steps, shift=shift, guidance=guidance, memory_guidance=scales[0]
  )
  pipes = {scales[0]: pipe}
  for g_m in scales[1:]:
    pipes[g_m] = pipe.with_settings(memory_guidance=g_m)
  runs = {}  # mode name -> (strategy, pipeline)
  for strategy in strategies:
    for g_m in scales if strategy != "none" else scales[:1]:
      runs[strategy if len(scales) == 1 or strategy == "none" else f"{strategy} g_m={g_m:g}"] = (strategy, pipes[g_m])
  modes = tuple(runs)
  system = pipe.system
  default = storyworld.StoryWorldConfig()  # the frame size of the run; StoryWorld's default story lengths
  cfg = storyworld.StoryWorldConfig.from_config(
      system.config.data, min_shots=default.min_shots, max_shots=default.max_shots
  )
  stories = [storyworld.generate_story(first_seed + i, pattern, cfg) for i in range(num_stories)]
  scores = {m: {k: [] for k in METRICS} for m in modes}
  by_later_shot = {m: {} for m in modes}  # C-Cons of pairs, keyed by the later shot's index
  per_story = {m: {k: [] for k in PER_STORY} for m in modes}  # for paired comparisons (here and in ablation.py)
  top1_hits = {m: [] for m in modes}  # does the best-ranked frame come from a shot that shares a character?
  f_lat = system.latent_shape[0]
  bar = logs.progress(len(stories), f"{pattern} stories x {len(modes)} memories", progress, unit="story")
  for i, s in enumerate(stories):
    spec = story_lib.parse_story(s, where=f"storyworld seed {first_seed + i}")
    for mode, (strategy, mode_pipe) in runs.items():
      run_ = mode_pipe.generate(spec.captions, seed=first_seed + i, memory=strategy)
      for j, shot in enumerate(run_.shots):
        chosen = shot.record["selected"]
        info = {
            "indices": np.asarray([c["memory_frame"] for c in chosen[:1]] or [0]),
            "valid": np.asarray([bool(chosen)]),
        }
        hit = selection_top1_hit(s, j, info, f_lat)
        if hit is not None:
          top1_hits[mode].append(hit)
      result = evaluate.evaluate_story(s, run_.frames)
      for k in PER_STORY:
        per_story[mode][k].append(result.get(k))
      for k in METRICS:
        if result.get(k) is not None:
          scores[mode][k].append(float(result[k]))
      for pair in result["character_pairs"]:
        by_later_shot[mode].setdefault(max(pair["shots"]) + 1, []).append(float(pair["score"]))
      if out:
        d = os.path.join(out, f"{pattern}_{first_seed + i}_{mode}")
        os.makedirs(d, exist_ok=True)
        np.savez(os.path.join(d, "frames.npz"), **{f"shot_{j}": f for j, f in enumerate(run_.frames)})
        with open(os.path.join(d, "story.json"), "w") as f:
          json.dump(s, f)
    bar.update(1)
  bar.close()
  return {
      "pattern": pattern,
      "num_stories": num_stories,
      "first_seed": first_seed,
      "memory": list(modes),
      **{f"sample_{k}": v for k, v in pipe.settings.items() if k != "memory_guidance"},
      "sample_memory_guidance": [p.settings["memory_guidance"] for p in pipes.values()],
      # Per mode: how often its best-ranked frame comes from an earlier shot that shows the recalled character.
      "top1_character_hit": {m: float(np.mean(v)) if v else None for m, v in top1_hits.items()},
      # Per-story C-Cons(first mode) - C-Cons(other mode), same seeds: mean, its standard error, stories that gain.
      "character_consistency_gain": {
          f"{modes[0]} - {m}": _paired(
              per_story[modes[0]]["character_consistency"], per_story[m]["character_consistency"]
          )
          for m in modes[1:]
      },
      # The same stories without a model: ground truth, and returning characters recoloured at random.
      "character_consistency_reference": reference_scores(stories, seed=first_seed),
      **{mode: {k: float(np.mean(v)) if v else None for k, v in scores[mode].items()} for mode in modes},
      "per_story": per_story,
      "character_consistency_by_later_shot": {
          mode: {str(k): round(float(np.mean(v)), 4) for k, v in sorted(by_later_shot[mode].items())} for mode in modes
      },
  }


def _scales(values: list[str] | None) -> tuple[float, ...] | None:
  try:
    return tuple(float(g) for g in values) if values else None
  except ValueError:
    raise ValueError(f"--memory_guidance: expected numbers separated by commas, got {','.join(values)!r}") from None


def main(argv):
  del argv
  compilation_cache.enable()
  f = flags.FLAGS
  print(
      json.dumps(
          run(
              f.workdir,
              f.pattern,
              f.num_stories,
              f.out,
              f.first_seed,
              steps=f.steps,
              shift=f.shift,
              memory=tuple(f.memory),
              guidance=f.guidance,
              memory_guidance=_scales(f.memory_guidance),
              progress=True,
          ),
          indent=2,
      )
  )


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "Training workdir or exported checkpoint (default: the shipped demo).")
  flags.DEFINE_enum("pattern", "recall", storyworld.PATTERNS, "StoryWorld story pattern.")
  flags.DEFINE_integer("num_stories", 16, "Number of stories (seeds first_seed, first_seed+1, ...).")
  flags.DEFINE_integer("first_seed", 0, "First story seed.")
  flags.DEFINE_string("out", None, "Optional directory for the generated frames.")
  flags.DEFINE_list(
      "memory",
      ["onestory", "none"],
      "Memory strategies to compare (onestory_jax/memory_strategies.py); the first is compared with each other.",
  )
  flags.DEFINE_integer("steps", None, "Sampler steps (default: the checkpoint config's sample.steps).")
  flags.DEFINE_float("shift", None, "Sampling time shift (default: sample.shift).")
  flags.DEFINE_float("guidance", None, "Classifier-free guidance scale (default: sample.guidance).")
  flags.DEFINE_list(
      "memory_guidance",
      None,
      "Memory guidance scales (0 = off; several: each strategy at each, paired with the first mode; default: "
      "sample.memory_guidance).",
  )
  logs.run(main)
