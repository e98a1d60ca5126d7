"""Adaptive Conditioner (paper Eqs. 7-8): budget allocation, packing, RoPE positions of context tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onestory_jax.models import adaptive_conditioner as ac

KERNELS = ((1, 2, 2), (1, 4, 4), (1, 8, 8))
PATCH = (1, 2, 2)


def test_token_counts_and_budget():
  assert ac.tokens_per_level((8, 8), KERNELS) == (16, 4, 1)
  # Wan 480p latent grid 60x104: (1,8,8) pads to 8x13.
  assert ac.tokens_per_level((60, 104), KERNELS) == (1560, 390, 104)
  assert ac.budget_tokens((60, 104), PATCH, 1.0) == 1560
  assert ac.budget_tokens((8, 8), PATCH, 1.5) == 24
  with pytest.raises(ValueError, match="finest first"):
    ac.tokens_per_level((8, 8), ((1, 8, 8), (1, 2, 2)))
  with pytest.raises(ValueError, match="budget_frames"):
    ac.budget_tokens((8, 8), PATCH, 0.01)


def test_allocation_examples():
  counts = (16, 4, 1)
  valid = jnp.ones((1, 4), bool)
  np.testing.assert_array_equal(ac.allocate_patchifiers(valid, counts, 16)[0], [1, 1, 1, 1])
  np.testing.assert_array_equal(ac.allocate_patchifiers(valid, counts, 24)[0], [0, 1, 2, 2])
  one = jnp.array([[True, False, False, False]])
  np.testing.assert_array_equal(ac.allocate_patchifiers(one, counts, 16)[0], [0, -1, -1, -1])
  # Budget smaller than K coarse tokens: the lowest-ranked frames are dropped.
  np.testing.assert_array_equal(ac.allocate_patchifiers(valid, counts, 2)[0], [2, 2, -1, -1])
  none = jnp.zeros((1, 4), bool)
  np.testing.assert_array_equal(ac.allocate_patchifiers(none, counts, 16)[0], [-1] * 4)


@pytest.mark.parametrize("counts", [(16, 4, 1), (1560, 390, 104), (9, 3)])
def test_allocation_never_exceeds_budget_and_is_monotone(counts):
  rng = np.random.default_rng(0)
  for budget in [1, 2, 3, 5, 8, 16, 17, 24, 40, 104, 390, 1560, 3120]:
    valid = jnp.asarray(rng.random((32, 5)) < 0.8)
    levels = np.asarray(ac.allocate_patchifiers(valid, counts, budget))
    used = np.where(levels >= 0, np.asarray(counts)[np.maximum(levels, 0)], 0).sum(axis=1)
    assert (used <= budget).all(), (budget, used.max())
    assert ((levels >= 0) <= np.asarray(valid)).all()  # only valid frames get tokens
    for row, v in zip(levels, np.asarray(valid)):
      kept = [l for l, ok in zip(row, v) if ok and l >= 0]
      assert kept == sorted(kept), row  # more relevant (earlier) frames never get coarser kernels than later ones
      if v.any() and budget >= counts[-1]:
        assert row[np.argmax(v)] >= 0  # the best frame always fits


def test_level_positions_are_region_centres():
  pos = ac.level_positions((8, 8), (1, 4, 4), PATCH)
  # A (1,4,4) token covers 2x2 DiT tokens; centre of the first one is (0.5, 0.5).
  np.testing.assert_allclose(pos[:2], [[0.5, 0.5], [0.5, 2.5]])
  np.testing.assert_allclose(ac.level_positions((8, 8), (1, 2, 2), PATCH)[:3], [[0, 0], [0, 1], [0, 2]])
  np.testing.assert_allclose(ac.level_positions((8, 8), (1, 8, 8), PATCH), [[1.5, 1.5]])


def _conditioner(budget):
  return ac.AdaptiveConditioner(kernels=KERNELS, patch=PATCH, dim=16, budget=budget)


def test_conditioner_packs_tokens_in_rank_order_with_positions():
  frames = jax.random.normal(jax.random.key(0), (2, 4, 8, 8, 6))
  valid = jnp.array([[True, True, True, True], [True, True, False, False]])
  time = jnp.array([[-3.0, -7.0, -1.0, -5.0], [-2.0, -1.0, 0.0, 0.0]])
  m = _conditioner(24)
  params = m.init(jax.random.key(1), frames, valid, time)
  out = m.apply(params, frames, valid, time)
  assert out["tokens"].shape == (2, 24, 16) and out["positions"].shape == (2, 24, 3)
  np.testing.assert_array_equal(out["levels"][0], [0, 1, 2, 2])
  np.testing.assert_array_equal(out["levels"][1], [0, 1, -1, -1])
  np.testing.assert_array_equal(out["mask"].sum(axis=1), [22, 20])
  pos = np.asarray(out["positions"][0])
  np.testing.assert_array_equal(pos[:16, 0], -3.0)  # frame 0 at (1,2,2): 16 tokens, its own time
  np.testing.assert_allclose(pos[:16, 1:], ac.level_positions((8, 8), (1, 2, 2), PATCH))
  np.testing.assert_array_equal(pos[16:20, 0], -7.0)
  np.testing.assert_allclose(pos[16:20, 1:], ac.level_positions((8, 8), (1, 4, 4), PATCH))
  np.testing.assert_allclose(pos[20:22], [[-1.0, 1.5, 1.5], [-5.0, 1.5, 1.5]])
  assert not np.asarray(out["mask"][0, 22:]).any()
  np.testing.assert_array_equal(np.asarray(out["tokens"][0, 22:]), 0.0)
  # The tokens are the patchifier outputs of the right frames.
  p1 = ac.Patchifier((1, 4, 4), 16).apply(
      {"params": jax.tree.map(lambda x: x, params["params"]["patchifier_1"])}, frames[:, 1:2]
  )
  np.testing.assert_allclose(out["tokens"][0, 16:20], p1[0, 0], rtol=1e-5, atol=1e-6)


def test_patchifier_equals_strided_conv():
  x = jax.random.normal(jax.random.key(0), (1, 2, 8, 8, 3))
  m = ac.Patchifier((1, 4, 4), 5)
  params = m.init(jax.random.key(1), x)
  out = m.apply(params, x)
  p = jax.tree.map(lambda a: a, params)["params"]
  kernel = np.asarray(p["kernel"].unbox() if hasattr(p["kernel"], "unbox") else p["kernel"])[0]
  bias = np.asarray(p["bias"].unbox() if hasattr(p["bias"], "unbox") else p["bias"])
  ref = (
      jax.lax.conv_general_dilated(
          x.reshape(2, 8, 8, 3), kernel, (4, 4), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
      )
      + bias
  )
  np.testing.assert_allclose(out.reshape(2, 4, 5), ref.reshape(2, 4, 5), rtol=1e-5, atol=1e-5)


def test_init_from_patch_embedding_preserves_constant_input():
  rng = np.random.default_rng(0)
  base = rng.normal(size=(1, 2, 2, 10, 7)).astype(np.float32)  # 10 input channels, 4 of them the latent
  ks = ac.init_patchifiers_from_patch_embedding(base, KERNELS, latent_channels=4)
  const = rng.normal(size=(4,)).astype(np.float32)
  ref = np.einsum("xyc,xycd->d", np.broadcast_to(const, (2, 2, 4)), base[0, :, :, :4])
  for k, w in zip(KERNELS, ks):
    assert w.shape == (1, k[1], k[2], 4, 7)
    np.testing.assert_allclose(np.einsum("xyc,xycd->d", np.broadcast_to(const, (k[1], k[2], 4)), w[0]), ref, rtol=1e-5)


def test_compact_frame_times_follow_chronology_of_the_selection():
  idx = jnp.array([[5, 1, 17, 9], [3, 0, 2, 2]])
  valid = jnp.array([[True, True, True, True], [True, True, False, False]])
  t = ac.compact_frame_times(idx, valid)
  np.testing.assert_array_equal(t[0], [-3.0, -4.0, -1.0, -2.0])  # 17 newest, then 9, 5, 1
  np.testing.assert_array_equal(t[1, :2], [-1.0, -2.0])  # invalid picks do not count
  # The same relative order at any history length: shifting all indices changes nothing.
  np.testing.assert_array_equal(ac.compact_frame_times(idx + 100, valid), t)
