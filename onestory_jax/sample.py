r"""Generates a multi-shot story with a trained OneStory model: a command line over :mod:`onestory_jax.pipeline`.

  python -m onestory_jax.sample --story=onestory_jax/assets/stories/recall.json --out=out/recall \
      [--workdir=DIR] [--seed=N] [--memory=full|none] [--steps=N] [--guidance=G] [--shift=S] [--memory_guidance=G_M]
  python -m onestory_jax.sample --out=out/recall --resume                 # continue an interrupted story
  python -m onestory_jax.sample --out=out/recall --regenerate=3 --seed=7 [--caption=TEXT] [--keep_later]

Without ``--workdir`` the shipped demo checkpoint is used. Writes ``shot_XX.mp4``, ``story.mp4``,
``contact_sheet.png``, ``frames.npz`` (lossless frames), ``latents.npz`` (the memory bank, read by ``--resume`` and
``--regenerate``) and ``manifest.json`` (the plan, and per shot its seed, the memory frames it selected with their
scores and patchifiers, and its generation time) to ``--out``. Shots are numbered from 0, as the files are.
``--regenerate=K`` rewrites shot K from the unchanged memory of the shots before it, then the shots after it from
the new memory (``--keep_later`` keeps them), in place. See docs/story_format.md for the story file.
"""

import os

from absl import flags

from onestory_jax import compilation_cache
from onestory_jax import locks
from onestory_jax import logs
from onestory_jax import memory_strategies
from onestory_jax import pipeline
from onestory_jax import sampler
from onestory_jax import story as story_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (latest checkpoint); default: the shipped demo.")
_STORY = flags.DEFINE_string("story", None, "Story file (JSON), see docs/story_format.md.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_SEED = flags.DEFINE_integer(
    "seed",
    None,
    "Story seed (default: the story file's 'seed', else 0); with " "--regenerate, the seed of the regenerated shot.",
)
_RESUME = flags.DEFINE_bool("resume", False, "Continue an interrupted story in --out from its manifest.")
_REGENERATE = flags.DEFINE_integer("regenerate", None, "Generate shot K (0-based) of the story in --out again.")
_CAPTION = flags.DEFINE_string("caption", None, "With --regenerate: the shot's new caption.")
_KEEP_LATER = flags.DEFINE_bool("keep_later", False, "With --regenerate: keep the shots after K as they are.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace the story already in --out.")
_MEMORY = flags.DEFINE_enum(
    "memory",
    None,
    memory_strategies.STRATEGIES + tuple(memory_strategies.ALIASES),
    "Which earlier frames condition each shot: 'onestory' (Frame Selection; 'full' is its old name), 'none' (the "
    "no-memory baseline), or a simpler strategy under the same token budget (onestory_jax/memory_strategies.py); "
    "default: the one the model was trained with (config.selection.strategy, normally 'onestory').",
)
_STEPS = flags.DEFINE_integer("steps", None, "Sampler steps (default: the checkpoint config's sample.steps).")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Classifier-free guidance scale (default: sample.guidance).")
_SHIFT = flags.DEFINE_float("shift", None, "Sampling time shift (default: sample.shift).")
_MEMORY_GUIDANCE = flags.DEFINE_float(
    "memory_guidance",
    None,
    "Memory guidance scale g_m: v += g_m (v_cond - v_without_memory), on every shot that has a memory; 0 = off; "
    "one more DiT row per step, so 1.5 times the sampling time (default: sample.memory_guidance, else 0).",
)
flags.mark_flags_as_required(["out"])


def main(argv):
  del argv  # logs.run: no positional arguments
  compilation_cache.enable()
  _check_flags()
  sampler.check_settings(
      steps=_STEPS.value, shift=_SHIFT.value, guidance=_GUIDANCE.value, memory_guidance=_MEMORY_GUIDANCE.value
  )
  with locks.exclusive(_OUT.value, "--out"):  # before anything loads: a second writer stops at once
    run = _sample()
  total = sum(s.record["seconds"] for s in run.shots)
  print(f"Wrote {len(run.shots)} shots to {_OUT.value} ({total:.1f} s of generation)")


def _check_flags() -> None:
  modes = [
      name
      for name, on in (
          ("--resume", _RESUME.value),
          ("--regenerate", _REGENERATE.value is not None),
          ("--overwrite", _OVERWRITE.value),
      )
      if on
  ]
  if len(modes) > 1:
    raise ValueError(f"{' and '.join(modes)} exclude each other: give one")
  if _REGENERATE.value is None and (_CAPTION.value is not None or _KEEP_LATER.value):
    raise ValueError("--caption and --keep_later go with --regenerate=K")
  if not modes or modes == ["--overwrite"]:
    if _STORY.value is None:
      raise ValueError("--story is required (a story file; see docs/story_format.md), unless --resume or --regenerate")
    existing = [n for n in (os.listdir(_OUT.value) if os.path.isdir(_OUT.value) else []) if not n.startswith(".lock")]
    if existing and not _OVERWRITE.value:
      raise ValueError(
          f"--out={_OUT.value} is not empty: pass --resume to continue the story there, --regenerate=K to redo a "
          "shot of it, or --overwrite to replace it"
      )


def _sample() -> pipeline.GeneratedStory:
  out = _OUT.value
  story = story_lib.load_story(_STORY.value) if _STORY.value else None  # a bad story stops before the model loads
  pipe = pipeline.OneStoryPipeline.from_pretrained(
      _WORKDIR.value,
      steps=_STEPS.value,
      shift=_SHIFT.value,
      guidance=_GUIDANCE.value,
      memory_guidance=_MEMORY_GUIDANCE.value,
  )
  if _RESUME.value or _REGENERATE.value is not None:
    run = pipe.open(out)
    if story is not None:
      planned = [p["caption"] for p in run.manifest["plan"]]
      if planned != story.captions:
        raise ValueError(
            f"{_STORY.value}: its captions differ from those of the story in {out}; resume without "
            "--story, or choose another --out"
        )
    if _RESUME.value and _SEED.value is not None and _SEED.value != run.seed:
      raise ValueError(f"--seed={_SEED.value} differs from the story's seed {run.seed} in {out}")
    if _REGENERATE.value is not None:
      if len(run.shots) <= _REGENERATE.value:
        run.resume(progress=True)  # an interrupted story is finished first, so that shot K exists
      run.regenerate(
          _REGENERATE.value, caption=_CAPTION.value, seed=_SEED.value, keep_later=_KEEP_LATER.value, progress=True
      )
    else:
      run.resume(progress=True)
  else:
    if _OVERWRITE.value:
      _remove_outputs(out)
    seed = _SEED.value if _SEED.value is not None else (story.seed if story.seed is not None else 0)
    run = pipe.story(seed=seed, start_image=story.start_image, memory=_MEMORY.value, out=out)
    run.plan(story.captions)
    run.resume(progress=True)
  run.save()
  return run


def _remove_outputs(out: str) -> None:
  """Removes the files a story writes (and nothing else) from ``out``."""
  for name in os.listdir(out) if os.path.isdir(out) else []:
    if (
        name in pipeline.OUTPUT_FILES
        or name == pipeline.MANIFEST
        or (name.startswith("shot_") and name.endswith(".mp4"))
    ):
      os.remove(os.path.join(out, name))


if __name__ == "__main__":
  logs.run(main, bad_input=(locks.InUse, ValueError, OSError))  # flags, the story file, the checkpoint
