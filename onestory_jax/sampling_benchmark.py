r"""Times story sampling: the first shot in a fresh process with the compilation cache cold and warm, and every shot.

  python -m onestory_jax.sampling_benchmark [--workdir=DIR] [--shots=10] [--memory_guidance=G_M]

Runs itself twice in fresh processes that share one new, empty persistent compilation cache
(:mod:`onestory_jax.compilation_cache`): the first process compiles the sampler's program and stores it, the second
loads it. Each generates the same ``--shots``-shot StoryWorld recall story with the checkpoint (default: the shipped
demo) and reports the time to load the checkpoint, then each shot's time (Frame Selection, the Adaptive
Conditioner, the DiT's sampling steps with classifier-free guidance, and decoding). Prints JSON: both processes'
figures, the first shot cold and warm, the median time of the steady shots (those whose memory fits the padded
capacity of the shot before, :func:`onestory_jax.sampler.memory_capacity`) and the ratio of the last steady shot's
time to the first's (flat means that the memory bank's growth does not slow sampling down), and the shots whose
memory needed a new capacity, cold and warm (each compiles, or loads from the cache, one conditioning program).
With memory guidance, shot 1 (the first with a memory) also compiles the step program with the no-memory row: it is
reported on its own (``first_guided_shot``), not among the steady shots.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import flags
import numpy as np

from onestory_jax import logs

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir or export; default: the shipped demo checkpoint.")
_SHOTS = flags.DEFINE_integer("shots", 10, "Shots in the story.")
_MEMORY_GUIDANCE = flags.DEFINE_float(
    "memory_guidance", None, "Memory guidance scale (default: the checkpoint config's sample.memory_guidance)."
)
_CHILD = flags.DEFINE_bool("child", False, "Internal: time one process (the parent runs two).")


def time_one_process(workdir: str | None, shots: int, memory_guidance: float | None = None) -> dict:
  """Load and per-shot times in this process (the caller controls the compilation cache)."""
  start = time.perf_counter()
  from onestory_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from onestory_jax import compilation_cache  # pylint: disable=g-import-not-at-top
  from onestory_jax import pipeline  # pylint: disable=g-import-not-at-top
  from onestory_jax import sampler  # pylint: disable=g-import-not-at-top
  from onestory_jax.data import storyworld  # pylint: disable=g-import-not-at-top

  compilation_cache.enable()
  system, params, enc = checkpoints.load_for_sampling(workdir)
  loaded = time.perf_counter()
  n = min(shots, 9)  # StoryWorld's longest story; longer runs repeat its captions
  cfg = storyworld.StoryWorldConfig.from_config(system.config.data, min_shots=n, max_shots=n)
  captions = [s["caption"] for s in storyworld.generate_story(4321, "recall", cfg, num_shots=n)["shots"]]
  pipe = pipeline.OneStoryPipeline(system, params, enc, memory_guidance=memory_guidance)
  story = pipe.story(seed=0)
  shot_s = []
  for i in range(shots):
    t = time.perf_counter()
    story.next_shot(captions[i % n])
    shot_s.append(time.perf_counter() - t)
  frames, k = system.latent_shape[0], int(system.config.selection.k_sel)
  capacity = [sampler.memory_capacity(i * frames, k) for i in range(shots)]
  return {"import_and_load_s": loaded - start, "shot_s": shot_s, "memory_capacity": capacity, **pipe.settings}


def main(argv):
  del argv
  if _CHILD.value:
    print(json.dumps(time_one_process(_WORKDIR.value, _SHOTS.value, _MEMORY_GUIDANCE.value)))
    return
  with tempfile.TemporaryDirectory() as cache:
    argv = [sys.executable, "-m", "onestory_jax.sampling_benchmark", "--child", f"--shots={_SHOTS.value}"]
    if _WORKDIR.value:
      argv.append(f"--workdir={_WORKDIR.value}")
    if _MEMORY_GUIDANCE.value is not None:
      argv.append(f"--memory_guidance={_MEMORY_GUIDANCE.value}")
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache)
    runs = {}
    for name in ("cold", "warm"):
      done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
      if done.returncode:
        raise ValueError(
            f"the {name} run failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"
        )
      runs[name] = json.loads(done.stdout.strip().splitlines()[-1])
  shots, capacity = runs["warm"]["shot_s"], runs["warm"]["memory_capacity"]
  # A shot whose memory outgrows the bank's padded capacity compiles (cold) or loads (warm) the conditioning
  # program for the new capacity (sampler.memory_capacity: once per doubling); the others reuse what is compiled.
  # With memory guidance the first shot that has a memory (shot 1) also compiles (or loads) the step program with the
  # no-memory row; shot 0 has no memory to guide by.
  guided = 1 if runs["warm"]["memory_guidance"] and len(shots) > 1 else None
  steady = [i for i in range(1, len(shots)) if capacity[i] == capacity[i - 1] and i != guided]
  grown = [i for i in range(1, len(shots)) if capacity[i] != capacity[i - 1]]
  out = {
      **runs,
      "first_shot_cold_s": runs["cold"]["shot_s"][0],
      "first_shot_warm_s": shots[0],
      "steady_shots": steady,
      "median_steady_shot_s": float(np.median([shots[i] for i in steady])) if steady else None,
      "last_over_first_steady": shots[steady[-1]] / shots[steady[0]] if len(steady) > 1 else None,
      "new_capacity_shots": {
          str(i): {"capacity": capacity[i], "cold_s": runs["cold"]["shot_s"][i], "warm_s": shots[i]} for i in grown
      },
      "first_guided_shot": (
          None
          if guided is None
          else {"shot": guided, "cold_s": runs["cold"]["shot_s"][guided], "warm_s": shots[guided]}
      ),
  }
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  logs.run(main)
