"""Rectified flow: the training objective of L_shot (paper Eq. 10) and the flow-matching sampler.

Conventions (design notes, "Training"): ``x_t = (1 - t) x_0 + t eps`` with ``t`` in [0, 1] (t = 1 is pure noise),
and the network predicts the velocity ``v = eps - x_0``. The DiT receives ``1000 t`` as its timestep, which is the
scale Wan2.1 was trained with.

Prediction target (``config.flow.prediction``). ``'v'``: the DiT outputs the velocity directly — what Wan2.1 was
trained with, so every pretrained config uses it. ``'x'``: the DiT outputs the clean latent ``x_0`` and the velocity
is ``(x_t - x_0) / t`` (t clipped at :data:`MIN_T`), following Li & He 2025 ("Back to Basics: Let Denoising
Generative Models Denoise"). A model whose tokens carry more values than its width (the lossless demo codec: 384
values per token at width 128) cannot pass per-value noise through that bottleneck, so v-prediction leaves the
noise in its samples; x-prediction only has to output the clean, low-dimensional content and works. Either way the
loss is the velocity MSE of Eq. 10, optionally weighted per sample (:func:`loss_weight`,
``config.flow.loss_weight_t``), and the sampler integrates velocities.

Time shift (SD3 / Wan): ``shift(t) = s t / (1 + (s - 1) t)`` moves probability mass towards noisier times for
larger resolutions; Wan2.1 samples 480p with ``s = 3``.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

TIMESTEP_SCALE = 1000.0
MIN_T = 0.05  # x-prediction: lower clip of t in (x_t - x_0) / t
PREDICTIONS = ("v", "x")


def shift_time(t: jax.Array, shift: float) -> jax.Array:
  """Resolution-dependent time shift ``s t / (1 + (s - 1) t)``; identity for ``shift == 1``."""
  return shift * t / (1.0 + (shift - 1.0) * t)


def sample_time(rng: jax.Array, batch: int, *, mean: float = 0.0, std: float = 1.0, shift: float = 1.0) -> jax.Array:
  """Logit-normal training times (Esser et al. 2024), then shifted. Returns float32 [batch] in (0, 1)."""
  u = mean + std * jax.random.normal(rng, (batch,), jnp.float32)
  return shift_time(jax.nn.sigmoid(u), shift)


def interpolate(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """``x_t = (1 - t) x_0 + t eps`` with ``t`` broadcast from [B]."""
  tb = t.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
  return (1.0 - tb) * x0 + tb * noise


def output_to_velocity(out: jax.Array, x_t: jax.Array, t: jax.Array, prediction: str) -> jax.Array:
  """The velocity implied by the network output under the ``prediction`` parameterisation."""
  if prediction == "v":
    return out
  if prediction == "x":
    tb = jnp.maximum(t, MIN_T).reshape((-1,) + (1,) * (x_t.ndim - 1)).astype(out.dtype)
    return (x_t - out) / tb
  raise ValueError(f"config.flow.prediction must be one of {PREDICTIONS}, got {prediction!r}")


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
  return noise - x0


def loss_weight(t: jax.Array, weight_t: float) -> jax.Array:
  """Per-sample weight ``min(1, (t / weight_t)^2)`` of the velocity MSE; 1 everywhere for ``weight_t = 0``.

  Since ``v - v_hat = (x_0_hat - x_0) / t``, the velocity MSE weighs the x_0 error by ``1 / t^2``. Below
  ``weight_t`` this weight caps it at ``1 / weight_t^2``, in the spirit of Min-SNR weighting (Hang et al. 2023),
  so that nearly clean samples, whose x_0 is almost given, do not dominate the gradient.
  """
  if weight_t <= 0.0:
    return jnp.ones_like(t)
  return jnp.minimum(1.0, jnp.square(t / weight_t))


def flow_loss(
    v_pred: jax.Array,
    x0: jax.Array,
    noise: jax.Array,
    weight: jax.Array | None = None,
    frame_mask: jax.Array | None = None,
) -> jax.Array:
  """L_shot: the (optionally per-sample ``weight`` [B]ed) squared velocity error, averaged over everything, or over
  the latent frames where ``frame_mask`` [B, F] is 1 (the frames a start image gives are not predicted)."""
  err = jnp.square(v_pred.astype(jnp.float32) - velocity_target(x0, noise).astype(jnp.float32))
  if weight is not None:
    err = err * weight.reshape((-1,) + (1,) * (err.ndim - 1)).astype(jnp.float32)
  if frame_mask is None:
    return jnp.mean(err)
  m = frame_mask.astype(jnp.float32).reshape(frame_mask.shape + (1,) * (err.ndim - 2))
  per_frame = math.prod(err.shape[2:])
  return jnp.sum(err * m) / jnp.maximum(jnp.sum(m) * per_frame, 1.0)


def sampling_times(steps: int, shift: float) -> jax.Array:
  """``steps + 1`` decreasing times from 1 (noise) to 0 (data), time-shifted."""
  if steps < 1:
    raise ValueError(f"sample.steps must be >= 1, got {steps}")
  return shift_time(jnp.linspace(1.0, 0.0, steps + 1, dtype=jnp.float32), shift)


def cfg_velocity(v_cond: jax.Array, v_uncond: jax.Array, guidance: float) -> jax.Array:
  """Classifier-free guidance: ``v_u + g (v_c - v_u)``."""
  return v_uncond + guidance * (v_cond - v_uncond)


def euler_sample(
    velocity_fn: Callable[[jax.Array, jax.Array], jax.Array], noise: jax.Array, times: jax.Array
) -> jax.Array:
  """Integrates ``dx/dt = v`` from ``times[0]`` (noise) to ``times[-1]`` with Euler steps.

  ``velocity_fn(x, t)`` takes the state and a scalar time in [0, 1]. Runs as a ``lax.fori_loop`` so the whole
  sampler is a single compiled program.
  """

  def body(i, x):
    t, t_next = times[i], times[i + 1]
    v = velocity_fn(x, t)
    return (x + (t_next - t) * v).astype(x.dtype)

  return jax.lax.fori_loop(0, times.shape[0] - 1, body, noise)
