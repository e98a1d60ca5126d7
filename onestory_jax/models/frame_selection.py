"""Frame Selection (paper Sec. 4.2, Eqs. 3-6 and 11).

Scores every latent frame of the global memory ``M`` (Eq. 2) against the current caption and keeps the ``K_sel``
most relevant ones:

* Eq. 3: ``Q' = Attn(Q, phi_T(t_i), phi_T(t_i))`` — ``m`` learnable queries read the projected caption.
* Eq. 4: ``M_1 = phi_V(M)``, ``Q'' = Attn(Q', M_1, M_1)`` — the queries read the projected memory. ``phi_V`` is
  two stride-2 convolutions per latent frame (spatial tokens / 16), then a linear map to the model width ``D``.
  The paper leaves open whether the selector knows where a frame sits in the story. Here every token of ``M_1``
  also carries the fixed sinusoidal encoding of its frame's shot index (:func:`shot_encoding`), because captions
  point back by position ("the place from shot 2", "the same first character"), and content alone cannot tell two
  characters of the same kind apart.
* Eq. 5: ``s = phi_P(M_1) Q''^T``, ``S = mean_q s`` — ``phi_P`` mean-pools a frame's tokens and projects it; the
  dot product is scaled by ``1/sqrt(D)`` (design notes). ``S`` is a raw score regressed onto labels in [-1, 1].
* Eq. 6: ``M_hat = TopK(M, S, K_sel)`` — hard top-K over the RAW latent memory (:func:`select_top_k`).
* Eq. 11: ``L_sel = 1/F sum_r (S_r - y_r)^2`` over the valid memory frames (:func:`selector_loss`).

Memory is padded to a static number of frames; ``memory_mask`` marks the real ones. Padded frames are never keys,
never selected and never in the loss.
"""

from __future__ import annotations

import math

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from onestory_jax.models import layers
from onestory_jax.models.wan import dit as wan_dit

_NEG = -1e9


class CrossAttentionBlock(nn.Module):
  """Pre-norm residual cross-attention followed by a pre-norm residual MLP: ``q + Attn(LN(q), kv, kv)``."""

  dim: int
  num_heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, q: jax.Array, kv: jax.Array, kv_mask: jax.Array | None = None) -> jax.Array:
    h = nn.LayerNorm(dtype=jnp.float32, name="norm_q")(q)
    kvn = nn.LayerNorm(dtype=jnp.float32, name="norm_kv")(kv)
    heads = self.num_heads
    proj = lambda name, x: einops.rearrange(  # noqa: E731
        layers.dense(self.dim, ("embed", "heads"), name, self.dtype)(x), "b l (h d) -> b l h d", h=heads
    )
    qh, kh, vh = proj("to_q", h), proj("to_k", kvn), proj("to_v", kvn)
    mask = None if kv_mask is None else kv_mask[:, None, None, :]
    out = jax.nn.dot_product_attention(qh, kh, vh, mask=mask, implementation="xla")
    out = einops.rearrange(out, "b l h d -> b l (h d)")
    q = q + layers.dense(self.dim, ("heads", "embed"), "to_out", self.dtype)(out)
    h = nn.LayerNorm(dtype=jnp.float32, name="norm_mlp")(q)
    h = layers.dense(4 * self.dim, ("embed", "mlp"), "mlp_in", self.dtype)(h)
    h = layers.dense(self.dim, ("mlp", "embed"), "mlp_out", self.dtype)(jax.nn.gelu(h))
    return q + h


class StoredConv(nn.Module):
  """A stride-2 3x3 ``SAME`` convolution (``nn.Conv``'s parameters and arithmetic) whose kernel is stored as
  ``store_axes`` and used as ``(None, None, 'conv_in', 'conv_out')``.

  ``phi_V``'s second kernel is ``D x D`` (3 x 3 x 5,120 x 5,120 at 14B: 0.88 GiB in float32), and its output axis is
  the only one split by the rules (over ``tensor``). Stored with its input channels on ``embed`` as well (over
  ``fsdp``), it and its AdamW moments take a quarter of the memory per chip at fsdp 4; the sharding constraint
  all-gathers it where it is used, as FSDP does for every weight, so the convolution and its gradient compute as
  they would with the kernel whole.
  """

  features: int
  store_axes: tuple[str | None, ...]
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (3, 3, x.shape[-1], self.features)
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(), self.store_axes), shape, jnp.float32
    )
    bias = self.param(
        "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)), (self.features,), jnp.float32
    )
    kernel = nn.with_logical_constraint(kernel, (None, None, "conv_in", "conv_out"))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = jax.lax.conv_general_dilated(x, kernel, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias


class MemoryProjector(nn.Module):
  """``phi_V``: two stride-2 3x3 convolutions per latent frame, then a linear map to ``D`` (Eq. 4)."""

  dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, memory: jax.Array) -> jax.Array:
    b, f = memory.shape[:2]
    x = einops.rearrange(memory, "b f h w c -> (b f) h w c").astype(self.dtype)
    # The first kernel is small (latent channels in); the second, D x D, is stored over fsdp too (StoredConv).
    for i, store in enumerate(((None, None, "conv_in", "conv_out"), (None, None, "embed", "conv_out"))):
      x = jax.nn.silu(StoredConv(self.dim, store, self.dtype, name=f"conv_{i}")(x))
    x = layers.dense(self.dim, ("conv_out", "embed"), "proj", self.dtype)(x)
    return einops.rearrange(x, "(b f) h w d -> b f (h w) d", b=b, f=f)


def shot_encoding(memory_shot: jax.Array, dim: int) -> jax.Array:
  """Sinusoidal encoding of each memory frame's shot index (0 = the story's first shot): [B, F] -> [B, F, dim].

  The timestep features of the DiT (:func:`wan_dit.timestep_embedding`) evaluated at the shot index: fixed, so
  it adds no parameters and covers stories of any length.
  """
  b, f = memory_shot.shape
  return wan_dit.timestep_embedding(memory_shot.reshape(-1), dim).reshape(b, f, dim)


def chronological_shots(batch: int, num_frames: int, frames_per_shot: int) -> jax.Array:
  """[B, F] shot index of each frame of a memory bank laid out oldest shot first, ``frames_per_shot`` latent frames
  each: the bank of the sampler (Eq. 2)."""
  return jnp.broadcast_to(jnp.arange(num_frames, dtype=jnp.int32) // frames_per_shot, (batch, num_frames))


class FrameSelection(nn.Module):
  """Scores memory frames against the caption (Eqs. 3-5). Returns ``S`` [B, F] (float32)."""

  dim: int
  num_queries: int
  num_heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
      self,
      text: jax.Array,
      text_mask: jax.Array | None,
      memory: jax.Array,
      memory_mask: jax.Array,
      memory_shot: jax.Array,
  ) -> jax.Array:
    """text [B, Lt, Dt]; text_mask [B, Lt] bool or None; memory [B, F, h, w, C]; memory_mask [B, F] bool;
    memory_shot [B, F] int: the shot of the story that each memory frame comes from."""
    b, f = memory.shape[:2]
    queries = self.param(
        "queries",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), ("queries", "embed")),
        (self.num_queries, self.dim),
    )
    q = jnp.broadcast_to(queries.astype(self.dtype), (b, self.num_queries, self.dim))
    text_p = layers.dense(self.dim, (None, "embed"), "phi_t", self.dtype)(text)  # phi_T
    q = CrossAttentionBlock(self.dim, self.num_heads, self.dtype, name="caption_attn")(q, text_p, text_mask)  # Eq. 3

    m1 = MemoryProjector(self.dim, self.dtype, name="phi_v")(memory)  # [B, F, n, D]
    m1 = m1 + shot_encoding(memory_shot, self.dim)[:, :, None, :].astype(m1.dtype)
    n = m1.shape[2]
    m1 = nn.with_logical_constraint(m1, ("batch", "frames", None, "embed"))
    kv = einops.rearrange(m1, "b f n d -> b (f n) d")
    kv_mask = jnp.repeat(memory_mask, n, axis=1)
    q = CrossAttentionBlock(self.dim, self.num_heads, self.dtype, name="memory_attn")(q, kv, kv_mask)  # Eq. 4

    frame_emb = layers.dense(self.dim, (None, "embed"), "phi_p", self.dtype)(jnp.mean(m1, axis=2))  # phi_P: [B, F, D]
    s = jnp.einsum("bfd,bqd->bfq", frame_emb.astype(jnp.float32), q.astype(jnp.float32)) / math.sqrt(self.dim)
    return jnp.mean(s, axis=-1)  # Eq. 5, S = F_mean(s)


def select_top_k(scores: jax.Array, memory_mask: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Eq. 6: indices of the ``k`` best valid frames, best first, and whether each pick is a real frame.

  With fewer than ``k`` valid frames the remaining picks are marked invalid (their index is arbitrary).
  Ties resolve to the lower frame index, so the result is deterministic.
  """
  masked = jnp.where(memory_mask, scores.astype(jnp.float32), _NEG)
  _, idx = jax.lax.top_k(masked, k)
  valid = jnp.take_along_axis(memory_mask, idx, axis=1)
  return idx, valid


def selector_loss(scores: jax.Array, labels: jax.Array, memory_mask: jax.Array) -> jax.Array:
  """Eq. 11: mean over valid frames of ``(S_r - y_r)^2``, then mean over the examples that have memory."""
  m = memory_mask.astype(jnp.float32)
  per_example = jnp.sum(m * jnp.square(scores.astype(jnp.float32) - labels), axis=1)
  count = jnp.sum(m, axis=1)
  has = (count > 0).astype(jnp.float32)
  per_example = per_example / jnp.maximum(count, 1.0)
  return jnp.sum(per_example * has) / jnp.maximum(jnp.sum(has), 1.0)
