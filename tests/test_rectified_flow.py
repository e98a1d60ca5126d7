"""Rectified flow (paper Eq. 10): interpolation, targets, time shift, parameterisations, Euler sampler, CFG."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onestory_jax import rectified_flow as rf


def test_interpolation_and_velocity_target():
  x0 = jnp.full((2, 3), 2.0)
  eps = jnp.full((2, 3), -1.0)
  t = jnp.array([0.0, 1.0])
  xt = rf.interpolate(x0, eps, t)
  np.testing.assert_allclose(xt, [[2.0] * 3, [-1.0] * 3])
  np.testing.assert_allclose(rf.velocity_target(x0, eps), -3.0)
  # d/dt x_t equals the velocity target.
  d = (rf.interpolate(x0, eps, jnp.array([0.6, 0.6])) - rf.interpolate(x0, eps, jnp.array([0.5, 0.5]))) / 0.1
  np.testing.assert_allclose(d, rf.velocity_target(x0, eps), rtol=1e-5)


def test_time_shift():
  t = jnp.linspace(0, 1, 11)
  np.testing.assert_allclose(rf.shift_time(t, 1.0), t, atol=1e-7)
  s = rf.shift_time(t, 3.0)
  assert float(s[0]) == 0.0 and abs(float(s[-1]) - 1.0) < 1e-6
  assert bool(jnp.all(s[1:-1] > t[1:-1]))  # shift > 1 moves mass to noisier times
  np.testing.assert_allclose(rf.shift_time(jnp.array(0.5), 3.0), 0.75, rtol=1e-6)


def test_sample_time_logit_normal():
  t = rf.sample_time(jax.random.key(0), 20000, mean=0.0, std=1.0)
  assert t.shape == (20000,) and bool(jnp.all((t > 0) & (t < 1)))
  assert abs(float(jnp.median(t)) - 0.5) < 0.02
  ts = rf.sample_time(jax.random.key(0), 20000, shift=3.0)
  assert float(jnp.median(ts)) > 0.7


def test_flow_loss_zero_for_exact_prediction():
  x0 = jax.random.normal(jax.random.key(0), (2, 4))
  eps = jax.random.normal(jax.random.key(1), (2, 4))
  assert float(rf.flow_loss(eps - x0, x0, eps)) == 0.0
  np.testing.assert_allclose(rf.flow_loss(eps - x0 + 1.0, x0, eps), 1.0, rtol=1e-6)


def test_loss_weight_caps_the_x0_error_weight_below_weight_t():
  t = jnp.array([0.1, 0.25, 0.5, 0.9])
  np.testing.assert_allclose(rf.loss_weight(t, 0.0), 1.0)
  np.testing.assert_allclose(rf.loss_weight(t, 0.5), [0.04, 0.25, 1.0, 1.0], rtol=1e-6)
  # With x-prediction the weighted velocity MSE is the x_0 MSE over max(t, weight_t)^2.
  x0 = jax.random.normal(jax.random.key(0), (4, 6))
  eps = jax.random.normal(jax.random.key(1), (4, 6))
  x0_hat = x0 + 0.1 * jax.random.normal(jax.random.key(2), (4, 6))
  v = rf.output_to_velocity(x0_hat, rf.interpolate(x0, eps, t), t, "x")
  per_sample = jnp.mean(jnp.square(x0_hat - x0), axis=1) / jnp.square(jnp.maximum(t, 0.5))
  np.testing.assert_allclose(rf.flow_loss(v, x0, eps, rf.loss_weight(t, 0.5)), jnp.mean(per_sample), rtol=1e-5)
  np.testing.assert_allclose(rf.flow_loss(v, x0, eps, rf.loss_weight(t, 0.0)), rf.flow_loss(v, x0, eps), rtol=1e-6)


@pytest.mark.parametrize("prediction", ["v", "x"])
def test_euler_with_exact_model_reaches_the_data(prediction):
  """For a single data point the exact velocity field is (x_t - x0) / t; Euler integration lands on x0."""
  x0 = jax.random.normal(jax.random.key(0), (3, 5))
  noise = jax.random.normal(jax.random.key(1), (3, 5))

  def model(x, t):
    out = x0 if prediction == "x" else (x - x0) / jnp.maximum(t, 1e-6)
    return rf.output_to_velocity(out, x, jnp.full((3,), t), prediction)

  out = rf.euler_sample(model, noise, rf.sampling_times(8, 3.0))
  np.testing.assert_allclose(out, x0, rtol=1e-4, atol=1e-4)


def test_x_prediction_velocity_and_errors():
  xt = jnp.ones((2, 3))
  x0 = jnp.zeros((2, 3))
  v = rf.output_to_velocity(x0, xt, jnp.array([0.5, 0.01]), "x")
  np.testing.assert_allclose(v[0], 2.0)
  np.testing.assert_allclose(v[1], 1.0 / rf.MIN_T)  # clipped denominator
  with pytest.raises(ValueError, match="flow.prediction"):
    rf.output_to_velocity(x0, xt, jnp.array([0.5, 0.5]), "eps")
  with pytest.raises(ValueError, match="steps"):
    rf.sampling_times(0, 1.0)


def test_cfg():
  c, u = jnp.array([2.0]), jnp.array([1.0])
  np.testing.assert_allclose(rf.cfg_velocity(c, u, 1.0), c)
  np.testing.assert_allclose(rf.cfg_velocity(c, u, 3.0), [4.0])
  np.testing.assert_allclose(rf.cfg_velocity(c, u, 0.0), u)
