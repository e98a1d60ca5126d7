"""Frame Selection (paper Eqs. 3-6, 11): shapes, masks, top-K, selector loss."""
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
  return text, jnp.ones((b, lt), bool), memory, mask


def test_scores_shape_and_param_names():
  text, tmask, memory, mask = _inputs()
  m = _module()
  params = m.init(jax.random.key(1), text, tmask, memory, mask)["params"]
  s = m.apply({"params": params}, text, tmask, memory, mask)
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
  text, tmask, memory, mask = _inputs()
  m = _module()
  params = m.init(jax.random.key(1), text, tmask, memory, mask)
  s1 = m.apply(params, text, tmask, memory, mask)
  memory2 = memory.at[1, 3:].set(100.0)  # change only padded frames of example 1
  s2 = m.apply(params, text, tmask, memory2, mask)
  np.testing.assert_allclose(s1[1, :3], s2[1, :3], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(s1[0], s2[0], rtol=1e-6)


def test_scores_depend_on_caption_and_on_the_frame():
  text, tmask, memory, mask = _inputs()
  m = _module()
  params = m.init(jax.random.key(1), text, tmask, memory, mask)
  s1 = m.apply(params, text, tmask, memory, mask)
  s2 = m.apply(params, text + 1.0, tmask, memory, mask)
  assert not np.allclose(s1, s2)
  assert np.std(np.asarray(s1[0])) > 0


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
  text, tmask, memory, mask = _inputs()
  m = _module()
  params = m.init(jax.random.key(1), text, tmask, memory, mask)
  labels = jnp.tile(jnp.array([[1.0, -1.0, 0.0, 1.0, -1.0, 0.0]]), (2, 1))

  def loss(p):
    return fs.selector_loss(m.apply(p, text, tmask, memory, mask), labels, mask)

  import optax
  tx = optax.adam(3e-3)
  opt = tx.init(params)
  l0 = loss(params)
  step = jax.jit(lambda p, o: (lambda g: (optax.apply_updates(p, tx.update(g, o, p)[0]), tx.update(g, o, p)[1]))(
      jax.grad(loss)(p)))
  for _ in range(60):
    params, opt = step(params, opt)
  assert loss(params) < 0.2 * l0
