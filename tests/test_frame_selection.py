"""Frame Selection (paper Eqs. 3-6, 11): shapes, masks, shot encoding, top-K, selector loss."""

import jax
import jax.numpy as jnp
import numpy as np

from onestory_jax.models import frame_selection as fs


def _module():
  return fs.FrameSelection(dim=32, num_queries=4, num_heads=2)


def _inputs(b=2, f=6, lt=5):
  k = jax.random.split(jax.random.key(0), 3)
  text = jax.random.normal(k[0], (b, lt, 24))
  memory = jax.random.normal(k[1], (b, f, 8, 8, 12))
  mask = jnp.array([[True] * f, [True] * (f // 2) + [False] * (f - f // 2)])[:b]
  return text, jnp.ones((b, lt), bool), memory, mask, fs.chronological_shots(b, f, 2)


def test_scores_shape_and_param_names():
  text, tmask, memory, mask, shot = _inputs()
  m = _module()
  params = m.init(jax.random.key(1), text, tmask, memory, mask, shot)["params"]
  s = m.apply({"params": params}, text, tmask, memory, mask, shot)
  assert s.shape == (2, 6) and s.dtype == jnp.float32
  assert {"queries", "phi_t", "phi_v", "phi_p", "caption_attn", "memory_attn"} <= set(params)
  assert params["queries"].unbox().shape == (4, 32)
  # phi_V: two stride-2 convolutions: 8x8 latent cells -> 2x2 tokens per frame.
  m1 = fs.MemoryProjector(32).apply({"params": nn_unbox(params["phi_v"])}, memory)
  assert m1.shape == (2, 6, 4, 32)


def nn_unbox(tree):
  import flax.linen as nn

  return nn.meta.unbox(tree)


def test_padded_frames_do_not_influence_valid_scores():
  text, tmask, memory, mask, shot = _inputs()
  m = _module()
  params = m.init(jax.random.key(1), text, tmask, memory, mask, shot)
  s1 = m.apply(params, text, tmask, memory, mask, shot)
  memory2 = memory.at[1, 3:].set(100.0)  # change only padded frames of example 1
  s2 = m.apply(params, text, tmask, memory2, mask, shot)
  np.testing.assert_allclose(s1[1, :3], s2[1, :3], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(s1[0], s2[0], rtol=1e-6)


def test_scores_depend_on_caption_and_on_the_frame():
  text, tmask, memory, mask, shot = _inputs()
  m = _module()
  params = m.init(jax.random.key(1), text, tmask, memory, mask, shot)
  s1 = m.apply(params, text, tmask, memory, mask, shot)
  s2 = m.apply(params, text + 1.0, tmask, memory, mask, shot)
  assert not np.allclose(s1, s2)
  assert np.std(np.asarray(s1[0])) > 0


def test_chronological_shots_and_shot_encoding():
  np.testing.assert_array_equal(fs.chronological_shots(2, 7, 3), [[0, 0, 0, 1, 1, 1, 2]] * 2)
  enc = fs.shot_encoding(jnp.array([[0, 1, 5]]), 8)
  assert enc.shape == (1, 3, 8)
  freqs = np.exp(-np.log(10000.0) * np.arange(4) / 4)
  np.testing.assert_allclose(enc[0, 2], np.concatenate([np.cos(5 * freqs), np.sin(5 * freqs)]), rtol=1e-6)
  np.testing.assert_allclose(enc[0, 0], [1, 1, 1, 1, 0, 0, 0, 0])


def test_scores_tell_identical_frames_apart_by_their_shot():
  """Captions point back by position ("the place from shot 2"); the selector can see each frame's shot."""
  text, tmask, memory, mask, _ = _inputs()
  same = jnp.broadcast_to(memory[:, :1], memory.shape)  # every memory frame identical
  shot = jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32), (2, 6))
  m = _module()
  params = m.init(jax.random.key(1), text, tmask, same, mask, shot)
  s = m.apply(params, text, tmask, same, mask, shot)
  assert np.std(np.asarray(s[0])) > 1e-4
  s0 = m.apply(params, text, tmask, same, mask, jnp.zeros_like(shot))
  np.testing.assert_allclose(s0[0], np.full(6, s0[0, 0]), rtol=1e-5)

  labels = jnp.where(shot == 3, 1.0, -1.0)  # "the one from shot 4": learnable from the shot alone
  loss = lambda p: fs.selector_loss(m.apply(p, text, tmask, same, mask, shot), labels, mask)
  import optax

  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(p, o):
    u, o = tx.update(jax.grad(loss)(p), o, p)
    return optax.apply_updates(p, u), o

  l0 = loss(params)
  for _ in range(150):
    params, opt = step(params, opt)
  assert loss(params) < 0.2 * l0
  idx, _ = fs.select_top_k(m.apply(params, text, tmask, same, mask, shot), mask, 1)
  assert int(idx[0, 0]) == 3


def test_top_k_order_mask_and_ties():
  scores = jnp.array([[0.1, 0.9, 0.5, 0.9, -0.2], [3.0, 2.0, 1.0, 0.0, 5.0]])
  mask = jnp.array([[True, True, True, True, True], [True, True, False, False, False]])
  idx, valid = fs.select_top_k(scores, mask, 3)
  np.testing.assert_array_equal(idx[0], [1, 3, 2])  # tie -> lower index first
  np.testing.assert_array_equal(valid[0], [True, True, True])
  np.testing.assert_array_equal(idx[1, :2], [0, 1])  # frame 4 (score 5) is padding: never chosen
  np.testing.assert_array_equal(valid[1], [True, True, False])


def test_selector_loss_matches_eq11():
  scores = jnp.array([[0.5, -0.5, 0.0, 9.0], [1.0, 1.0, 1.0, 1.0], [4.0, 4.0, 4.0, 4.0]])
  labels = jnp.array([[1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
  mask = jnp.array([[True, True, True, False], [True, True, True, True], [False] * 4])
  loss = fs.selector_loss(scores, labels, mask)
  expected = np.mean([(0.25 + 0.25 + 0.0) / 3, 1.0])  # third example has no memory: excluded
  np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_selector_learns_labels_by_gradient():
  text, tmask, memory, mask, shot = _inputs()
  m = _module()
  params = m.init(jax.random.key(1), text, tmask, memory, mask, shot)
  labels = jnp.tile(jnp.array([[1.0, -1.0, 0.0, 1.0, -1.0, 0.0]]), (2, 1))

  def loss(p):
    return fs.selector_loss(m.apply(p, text, tmask, memory, mask, shot), labels, mask)

  import optax

  tx = optax.adam(3e-3)
  opt = tx.init(params)
  l0 = loss(params)
  step = jax.jit(
      lambda p, o: (lambda g: (optax.apply_updates(p, tx.update(g, o, p)[0]), tx.update(g, o, p)[1]))(jax.grad(loss)(p))
  )
  for _ in range(60):
    params, opt = step(params, opt)
  assert loss(params) < 0.2 * l0
