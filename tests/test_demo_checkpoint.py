"""The shipped demo checkpoint loads (orbax + JSON only), samples without --workdir, and selects what captions
recall."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from onestory_jax import checkpoints
from onestory_jax import memory_ablation
from onestory_jax import sampler
from onestory_jax.data import storyworld


def test_shipped_checkpoint_samples_a_shot():
  assert os.path.isdir(os.path.join(checkpoints.DEMO_CHECKPOINT, "params"))
  system, params, enc = checkpoints.load_for_sampling(None)
  assert system.config.variant == "demo" and system.latent_shape == (4, 8, 8, 96)
  assert tuple(system.config.model.patch_size) == (1, 1, 1) and system.config.sample.shift == 3.0
  gen = sampler.ShotGenerator(system, params, enc, steps=2, shift=1.0, guidance=3.0)
  lat, info = gen("a red round character moves left in a green place, wide view.", [], seed=0)
  frames = gen.decode(lat)
  assert frames.shape == (8, 32, 32, 3) and frames.dtype == np.uint8
  assert frames.std() > 0
  lat2, info2 = gen(
      "the same first round character moves right in the green place from shot 1, wide view.", [lat], seed=1
  )
  # K_sel = 4 frames under a budget of 1.5 latent frames (96 tokens): the best at the DiT's own (1, 1, 1) patch
  # (64 tokens), the next at (1, 2, 2) (16), the last two at (1, 4, 4) (4 each) = 88 tokens.
  kernels = [tuple(k) for k in system.config.conditioner.kernels]
  assert kernels == [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 8, 8)] and system.config.conditioner.budget_frames == 1.5
  assert int(info2["context_tokens"]) == 88 and info2["valid"].sum() == 4
  assert np.asarray(info2["levels"]).reshape(-1).tolist() == [0, 1, 2, 2]


def test_shipped_frame_selection_finds_the_recalled_character():
  """On insert-and-recall stories with ground-truth memory, the best-scored frame shows the caption's character.

  Captions name a returning character only by its order and kind ("the same first round character"), so this needs
  the shot encoding and the kind (README, "The shipped demo checkpoint", has the hit rates with and without it).
  """
  system, params, enc = checkpoints.load_for_sampling(None)
  f_lat = system.latent_shape[0]

  @jax.jit
  def choose(tokens, memory, mask):
    cond = system.condition(params, enc, tokens, memory, mask)
    return cond.indices, cond.valid

  hits = []
  for seed in range(16):
    story = storyworld.generate_story(seed, "recall")
    latents = np.asarray(system.encode_shots(enc, jnp.asarray(np.stack(storyworld.render_story(story)))[None])[0])
    for j in range(1, len(story["shots"])):
      bank = latents[:j].reshape((-1,) + latents.shape[2:])
      memory = np.zeros((1, 5 * f_lat) + bank.shape[1:], np.float32)
      mask = np.zeros((1, 5 * f_lat), bool)
      memory[0, : len(bank)], mask[0, : len(bank)] = bank, True
      idx, valid = choose(system.tokenizer.encode([story["shots"][j]["caption"]]), memory, mask)
      hit = memory_ablation.selection_top1_hit(story, j, {"indices": idx[0], "valid": valid[0]}, f_lat)
      if hit is not None:
        hits.append(hit)
  assert len(hits) >= 30
  assert np.mean(hits) >= 0.9, f"top-1 hit {np.mean(hits):.2f} on {len(hits)} recall shots"
