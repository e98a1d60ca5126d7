"""The OneStory training objective (paper Sec. 4.4, Eqs. 10-12): one batch of triplets -> the loss and its parts.

Each sample of a batch (:func:`onestory_jax.data.pipeline.batch_spec`) is a 3-shot triplet (memory shot 0, memory
shot 1, target):

* ``L_shot`` (Eq. 10): rectified flow on the target shot's latents, conditioned on the target caption only and on
  the context tokens of the selected memory frames.
* ``L_sel`` (Eq. 11): MSE of the Frame Selection scores against the per-frame pseudo-labels; the total is
  ``L = L_shot + λ L_sel`` (Eq. 12, ``config.selection.lambda_sel``).
* Decoupled conditioning: during the first ``config.warmup_fraction_dc`` of the steps the context comes from
  ``K_sel`` frames drawn uniformly from the real first shot instead of the selector's top-K (the data pipeline
  feeds only synthetic triplets then, :func:`dc_warmup_steps`). ``L_sel`` is on throughout.
* Classifier-free guidance dropout: the caption is replaced by the null (all-padding) caption with
  ``flow.p_drop_text``; the memory is emptied with ``flow.p_drop_memory``. With ``flow.p_i2v`` the target is
  trained as an I2MSV first shot instead: no memory, its own first frame through the I2V channel path and image
  tokens.
* Precomputed batches (``data.source='multishot'``, :func:`onestory_jax.data.multishot.layout.example_spec`): with
  ``latents`` in the batch the shots are not encoded, ``text`` (when stored) replaces the text encoder, and the I2V
  paths take ``start_latents`` and ``images``, so the step runs neither the VAE nor a frozen text encoder; the
  pseudo-labels are per memory latent frame (``sel_labels`` [B, 2, F]) instead of per memory shot.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from onestory_jax import memory_strategies
from onestory_jax import next_shot
from onestory_jax import rectified_flow as rf
from onestory_jax.models import codec as codec_lib
from onestory_jax.models import frame_selection as fs


def dc_warmup_steps(config) -> int:
  """Training steps of the decoupled-conditioning warm-up (``warmup_fraction_dc`` of ``num_train_steps``)."""
  return int(round(config.warmup_fraction_dc * config.num_train_steps))


def uniform_first_shot_choice(rng: jax.Array, real_first: jax.Array, frames_per_shot: int, k: int):
  """K frames drawn uniformly without replacement from the real first shot (the warm-up's choice).

  Args:
    rng: key.
    real_first: bool [B, 2], which memory shot is the real first shot.
    frames_per_shot: latent frames per shot.
    k: frames to draw (``K_sel``).

  Returns:
    (indices [B, K] into the 2-shot memory, valid [B, K]).
  """
  frame_mask = jnp.repeat(real_first, frames_per_shot, axis=1)  # [B, F]
  u = jax.random.uniform(rng, frame_mask.shape)
  _, idx = jax.lax.top_k(jnp.where(frame_mask, u, -1.0), k)
  return idx, jnp.take_along_axis(frame_mask, idx, axis=1)


def loss_fn(params: Any, system: next_shot.System, enc: dict, batch: dict, rng: jax.Array, step: jax.Array):
  """``L = L_shot + λ L_sel`` (Eq. 12) of one batch, and its parts as metrics.

  Args:
    params: OneStory parameters.
    system: the model and its frozen encoders (:func:`next_shot.make_system`).
    enc: the frozen encoders' parameters (:meth:`next_shot.System.encoder_params`).
    batch: a global batch as :func:`onestory_jax.data.pipeline.batch_spec` lays it out (pixels, or the precomputed
      arrays of built records).
    rng: key of this step.
    step: the training step (selects the decoupled-conditioning warm-up).

  Returns:
    (loss, metrics) with ``loss``, ``l_shot``, ``l_sel`` and the mean number of ``context_tokens``.
  """
  c = system.config
  f_lat = system.latent_shape[0]
  precomputed = "latents" in batch  # records (data.source='multishot'): no VAE in the step
  if precomputed:
    lat = batch["latents"].astype(jnp.float32)  # [B, 3, F, h, w, C]
  else:
    lat = system.encode_shots(enc, batch["frames"])  # [B, 3, F, h, w, C]
  b = lat.shape[0]
  memory = lat[:, :2].reshape((b, 2 * f_lat) + lat.shape[3:])
  x0 = lat[:, 2]
  r_text, r_mem, r_i2v, r_warm, r_t, r_noise = jax.random.split(rng, 6)

  i2v = (jax.random.uniform(r_i2v, (b,)) < c.flow.p_i2v) & (system.first_frame != "none")
  keep_memory = (jax.random.uniform(r_mem, (b,)) >= c.flow.p_drop_memory) & ~i2v
  memory_mask = jnp.broadcast_to(keep_memory[:, None], (b, 2 * f_lat))
  drop_text = jax.random.uniform(r_text, (b,)) < c.flow.p_drop_text
  tokens = jnp.where(drop_text[:, None], 0, batch["tokens"])
  # Stored caption embeddings (a frozen text encoder): a dropped caption is the null caption, all zeros.
  text = jnp.where(drop_text[:, None, None], 0.0, batch["text"]) if "text" in batch else None

  warm = step < dc_warmup_steps(c)
  f_idx, f_valid = uniform_first_shot_choice(r_warm, batch["real_first"], f_lat, c.selection.k_sel)
  choice = memory_strategies.training_choice(c.selection.get("strategy", "onestory"), 2, f_lat, c.selection.k_sel)
  if choice is None:  # Frame Selection chooses, except in the warm-up
    forced = (jnp.broadcast_to(warm, (b,)), f_idx, f_valid & keep_memory[:, None])
  else:  # a simpler memory (paper Table 2a, Fig. 6: each variant trained with its own scheme), after the warm-up
    s_idx, s_valid = (jnp.broadcast_to(jnp.asarray(a), (b,) + a.shape) for a in choice)
    forced = (
        jnp.ones((b,), bool),
        jnp.where(warm, f_idx, s_idx),
        jnp.where(warm, f_valid, s_valid) & keep_memory[:, None],
    )

  memory_shot = jnp.repeat(batch["memory_shots"], f_lat, axis=1)
  stored = {}
  if precomputed:
    # The image path takes the stored image-encoder inputs (one per latent frame; the target's first is its first
    # frame) and the channel path the stored first-frame latents; neither calls the VAE.
    images = batch.get("images")
    if images is not None:
      first = codec_lib.to_unit(images[:, 2, 0])
      stored["memory_images"] = images[:, :2].reshape((b, 2 * f_lat) + images.shape[3:])
    else:
      first = jnp.zeros((b, c.data.height, c.data.width, 3), jnp.float32)
    stored["start_latents"] = batch["start_latents"] if "start_latents" in batch else jnp.zeros_like(x0)
  else:
    first = codec_lib.to_unit(batch["frames"][:, 2, 0])
  cond = system.condition(
      params,
      enc,
      tokens,
      memory,
      memory_mask,
      memory_shot=memory_shot,
      forced=forced,
      start_image=first,
      start_present=i2v,
      text=text,
      **stored,
  )

  t = rf.sample_time(r_t, b, mean=c.flow.logit_normal_mean, std=c.flow.logit_normal_std, shift=c.flow.timestep_shift)
  noise = jax.random.normal(r_noise, x0.shape, x0.dtype)
  v = system.velocity(params, cond, rf.interpolate(x0, noise, t), t)
  # Wan2.2-TI2V: the latent frame that a start image gives is not predicted.
  predicted = 1.0 - system.given_frames(cond) if system.first_frame == "latent" else None
  l_shot = rf.flow_loss(v, x0, noise, rf.loss_weight(t, c.flow.loss_weight_t), predicted)
  sel = batch["sel_labels"]  # [B, 2] per memory shot, or [B, 2, F] per memory latent frame (records)
  labels = sel.reshape((b, 2 * f_lat)) if sel.ndim == 3 else jnp.repeat(sel, f_lat, axis=1)
  l_sel = fs.selector_loss(cond.scores, labels, memory_mask)
  loss = l_shot + c.selection.lambda_sel * l_sel
  metrics = {
      "loss": loss,
      "l_shot": l_shot,
      "l_sel": l_sel,
      "context_tokens": jnp.mean(jnp.sum(cond.context["mask"], axis=1).astype(jnp.float32)),
  }
  return loss, metrics
