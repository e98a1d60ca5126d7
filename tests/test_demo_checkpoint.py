"""The shipped demo checkpoint loads (orbax + JSON only) and samples without --workdir."""
import os

import numpy as np

from onestory_jax import checkpoints
from onestory_jax import sampler


def test_shipped_checkpoint_samples_a_shot():
  assert os.path.isdir(os.path.join(checkpoints.DEMO_CHECKPOINT, "params"))
  system, params, enc = checkpoints.load_for_sampling(None)
  assert system.config.variant == "demo" and system.latent_shape == (4, 8, 8, 96)
  assert tuple(system.config.model.patch_size) == (1, 1, 1) and system.config.sample.shift == 3.0
  gen = sampler.ShotGenerator(system, params, enc, max_shots=2, steps=2, shift=1.0, guidance=3.0)
  lat, info = gen("a red round character moves left in a green place, wide view.", [], seed=0)
  frames = gen.decode(lat)
  assert frames.shape == (8, 32, 32, 3) and frames.dtype == np.uint8
  assert frames.std() > 0
  lat2, info2 = gen("the same first round character moves right in the green place from shot 1, wide view.",
                    [lat], seed=1)
  # K_sel = 4 frames under a budget of 1.5 latent frames (96 tokens): the best at the DiT's own (1, 1, 1) patch
  # (64 tokens), the next at (1, 2, 2) (16), the last two at (1, 4, 4) (4 each) = 88 tokens.
  kernels = [tuple(k) for k in system.config.conditioner.kernels]
  assert kernels == [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 8, 8)] and system.config.conditioner.budget_frames == 1.5
  assert int(info2["context_tokens"]) == 88 and info2["valid"].sum() == 4
  assert np.asarray(info2["levels"]).reshape(-1).tolist() == [0, 1, 2, 2]
