"""OneStory: next-shot generation over a global memory (paper Eq. 1, Fig. 3).

``S_i = G(E, {S_j}_{j<i}, T, C_i)``: the trainable part of ``G`` is one Flax module holding

* ``text_encoder`` — ``T`` (a small T5-style encoder in the demo; umT5 in real configs, frozen there),
* ``frame_selection`` — Eqs. 3-6 (scores the memory against the caption),
* ``adaptive_conditioner`` — Eq. 7 (context tokens under a budget),
* ``dit`` — the Wan2.1 DiT, which takes ``X = concat([N, C])`` (Eq. 8).

The codec ``E`` (space-to-depth in the demo, the Wan VAE in real configs) and the I2V image encoder (patches /
CLIP) are frozen and live outside this module with their own parameters; :mod:`onestory_jax.next_shot` wires them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from onestory_jax.models import adaptive_conditioner as ac
from onestory_jax.models import frame_selection as fs
from onestory_jax.models.wan import dit as wan_dit
from onestory_jax.models.wan import umt5 as te


def dit_in_channels(latent_channels: int, mask_channels: int, i2v: bool) -> int:
  """Channels of the DiT's input ``X``: the noisy latent, plus (Wan2.1-I2V) the first-frame mask and latent."""
  return latent_channels + (mask_channels + latent_channels if i2v else 0)


class OneStory(nn.Module):
  """The trainable OneStory model. ``config`` is a FrozenConfigDict of the whole run config."""

  config: ml_collections.FrozenConfigDict
  latent_hw: tuple[int, int]
  latent_channels: int
  mask_channels: int
  vocab_size: int
  image_dim: int

  def setup(self):
    c = self.config
    dtype = jnp.dtype(c.model.dtype)
    self.text_encoder = te.make_text_encoder(c, self.vocab_size)
    self.frame_selection = fs.FrameSelection(
        dim=c.model.dim, num_queries=c.selection.num_queries, num_heads=c.selection.num_heads, dtype=dtype
    )
    self.adaptive_conditioner = ac.AdaptiveConditioner(
        kernels=tuple(tuple(k) for k in c.conditioner.kernels),
        patch=tuple(c.model.patch_size),
        dim=c.model.dim,
        budget=self.budget,
        dtype=dtype,
    )
    self.dit = wan_dit.make_dit(
        c,
        in_channels=self.in_channels,
        out_channels=self.latent_channels,
        text_dim=te.text_dim(c),
        image_dim=self.image_dim if c.model.i2v else None,
    )

  @property
  def in_channels(self) -> int:
    return dit_in_channels(self.latent_channels, self.mask_channels, self.config.model.i2v)

  @property
  def budget(self) -> int:
    return ac.budget_tokens(self.latent_hw, self.config.model.patch_size, self.config.conditioner.budget_frames)

  def encode_text(self, tokens: jax.Array) -> jax.Array:
    """T(C_i): [B, Lt] int32 -> [B, Lt, D_t] (zero at padding, as Wan feeds its DiT)."""
    return self.text_encoder(tokens)

  def score_memory(
      self, text: jax.Array, text_mask: jax.Array, memory: jax.Array, memory_mask: jax.Array, memory_shot: jax.Array
  ) -> jax.Array:
    """Eqs. 3-5: relevance score S [B, F] of every memory frame (``memory_shot``: each frame's shot index)."""
    return self.frame_selection(text, text_mask, memory, memory_mask, memory_shot)

  def build_context(self, frames: jax.Array, valid: jax.Array, frame_time: jax.Array) -> dict:
    """Eq. 7: context tokens of the selected frames (best first)."""
    return self.adaptive_conditioner(frames, valid, frame_time)

  def velocity(
      self, x: jax.Array, timestep: jax.Array, text: jax.Array, image: jax.Array | None, context: dict | None
  ) -> jax.Array:
    """Eq. 8: the DiT on ``[noise tokens; context tokens]``; returns the velocity of the noise latents only."""
    image = image if self.config.model.i2v else None  # T2V / TI2V backbones have no image cross-attention
    kw = {}
    if context is not None:
      kw = dict(context=context["tokens"], context_pos=context["positions"], context_mask=context["mask"])
    return self.dit(x, timestep, text, image, **kw)

  def __call__(self, tokens, memory, memory_mask, x, timestep, image):
    """Runs every part once (used for initialisation and shape inference)."""
    text = self.encode_text(tokens)
    scores = self.score_memory(text, tokens != 0, memory, memory_mask, jnp.zeros(memory_mask.shape, jnp.int32))
    idx, valid = fs.select_top_k(scores, memory_mask, self.config.selection.k_sel)
    frames = jnp.take_along_axis(memory, idx[:, :, None, None, None], axis=1)
    ctx = self.build_context(frames, valid, ac.compact_frame_times(idx, valid))
    return self.velocity(x, timestep, text, image, ctx), scores
