r"""Generates a multi-shot story with a trained OneStory model.

  python -m onestory_jax.sample --workdir=workdirs/demo --story=onestory_jax/assets/stories/recall.json \
      --out=out/recall [--seed=N] [--resume] [--memory=full|none] [--steps=N] [--guidance=G] [--shift=S]

Without ``--workdir`` the shipped demo checkpoint is used. Writes ``shot_XX.mp4``, ``story.mp4``,
``contact_sheet.png``, ``frames.npz`` (lossless) and ``manifest.json`` (captions, seeds, the memory frames each
shot selected with their scores and patchifiers) to ``--out``. See docs/story_format.md for the story file.
"""

from absl import app
from absl import flags
from absl import logging

from onestory_jax import checkpoints
from onestory_jax import compilation_cache
from onestory_jax import locks
from onestory_jax import logs
from onestory_jax import sampler
from onestory_jax import story as story_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (latest checkpoint); default: the shipped demo.")
_STORY = flags.DEFINE_string("story", None, "Story file (JSON), see docs/story_format.md.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_SEED = flags.DEFINE_integer("seed", None, "Story seed (default: the story file's 'seed', else 0).")
_RESUME = flags.DEFINE_bool("resume", False, "Continue an interrupted story in --out from its manifest.")
_MEMORY = flags.DEFINE_enum("memory", "full", sampler.MEMORY_MODES, "'none' = the no-memory baseline.")
_STEPS = flags.DEFINE_integer("steps", None, "Sampler steps (default: the checkpoint config's sample.steps).")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Classifier-free guidance scale (default: sample.guidance).")
_SHIFT = flags.DEFINE_float("shift", None, "Sampling time shift (default: sample.shift).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the traceback of an error, not just its one line.")
flags.mark_flags_as_required(["story", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logs.quiet_libraries()
  compilation_cache.enable()
  try:
    sampler.check_settings(steps=_STEPS.value, shift=_SHIFT.value, guidance=_GUIDANCE.value)
    with locks.exclusive(_OUT.value, "--out"):  # before anything loads: a second writer stops at once
      manifest = _sample()
  except (locks.InUse, ValueError, OSError) as e:  # bad input: flags, the story file, the checkpoint
    logs.exit_with(e, 2, _VERBOSE.value)
  logging.info("Wrote %d shots to %s", len(manifest["shots"]), _OUT.value)
  print(f"Wrote {len(manifest['shots'])} shots to {_OUT.value}")


def _sample() -> dict:
  story = story_lib.load_story(_STORY.value)  # a bad story file stops the run before the model loads
  system, params, enc = checkpoints.load_for_sampling(_WORKDIR.value)
  sm = system.config.sample
  seed = _SEED.value if _SEED.value is not None else (story.seed if story.seed is not None else 0)
  pick = lambda flag, default: default if flag.value is None else flag.value
  gen = sampler.ShotGenerator(
      system,
      params,
      enc,
      max_shots=len(story.shots),
      steps=pick(_STEPS, sm.steps),
      shift=pick(_SHIFT, sm.shift),
      guidance=pick(_GUIDANCE, sm.guidance),
  )
  return sampler.generate_story(gen, story, _OUT.value, seed=seed, memory=_MEMORY.value, resume=_RESUME.value)


if __name__ == "__main__":
  app.run(main)
