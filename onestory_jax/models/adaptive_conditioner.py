"""Adaptive Conditioner (paper Sec. 4.3, Eqs. 7-8).

The ``K_sel`` frames chosen by Frame Selection (best first) are patchified into a compact set of context tokens:

* Eq. 7: a set of patchifiers ``P_l`` with distinct kernels (finest first, in latent cells, e.g. (1,2,2) = the
  DiT's own patch, (1,4,4), (1,8,8)). The selected indices are split into disjoint subsets ``I_l`` by score rank —
  more relevant frames get finer kernels — and ``C = concat_l P_l(M_hat[I_l])`` has ``N_c`` tokens.
* Budget: ``N_c`` never exceeds ``B`` latent-frame equivalents, i.e. ``B * (h/ph) * (w/pw)`` tokens
  (:func:`allocate_patchifiers`). The best frame gets the finest kernel that still leaves room for every remaining
  selected frame at the coarsest kernel; then greedily down the ranks; frames that do not fit are dropped.
* Eq. 8: ``X = concat([N, C])`` — the DiT appends the context tokens to the noise tokens. Each context token has
  its own 3D RoPE position: temporal = the selected frame's chronological rank among the selected frames, placed
  just before the current shot (-K .. -1, :func:`compact_frame_times`); spatial = the centre of the region it
  covers, in full-resolution token coordinates (:func:`level_positions`).

Everything has static shapes: every selected frame is patchified at every level, and a gather packs the tokens that
the allocation keeps into a fixed ``N_c`` buffer with a validity mask, so one compiled step serves every shot.
"""

from __future__ import annotations

import math
from typing import Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Kernel = tuple[int, int, int]


def level_grid(latent_hw: tuple[int, int], kernel: Kernel) -> tuple[int, int]:
  """Token grid of one latent frame under ``kernel`` (the frame is zero-padded up to a multiple of the kernel)."""
  if kernel[0] != 1:
    raise ValueError(f"conditioner.kernels: temporal kernel must be 1 (per-frame patchifiers), got {kernel}")
  return math.ceil(latent_hw[0] / kernel[1]), math.ceil(latent_hw[1] / kernel[2])


def tokens_per_level(latent_hw: tuple[int, int], kernels: Sequence[Kernel]) -> tuple[int, ...]:
  counts = tuple(int(np.prod(level_grid(latent_hw, k))) for k in kernels)
  if any(a < b for a, b in zip(counts, counts[1:])):
    raise ValueError(f"conditioner.kernels must be ordered finest first, got {tuple(kernels)}")
  return counts


def budget_tokens(latent_hw: tuple[int, int], patch: Sequence[int], budget_frames: float) -> int:
  """Context budget in tokens: ``budget_frames`` latent-frame equivalents of DiT tokens."""
  per_frame = math.ceil(latent_hw[0] / patch[1]) * math.ceil(latent_hw[1] / patch[2])
  n = int(math.floor(budget_frames * per_frame))
  if n < 1:
    raise ValueError(f"conditioner.budget_frames={budget_frames} gives no context token ({per_frame} per frame)")
  return n


def allocate_patchifiers(valid: jax.Array, counts: Sequence[int], budget: int) -> jax.Array:
  """Assigns a patchifier level to each selected frame, in rank order (best first).

  Args:
    valid: bool [B, K], whether each rank holds a real memory frame.
    counts: tokens per frame of each level, finest first (strictly non-increasing).
    budget: the token budget ``N_c``.
  Returns:
    int32 [B, K]: the level index, or -1 where the frame is dropped. ``sum(counts[level]) <= budget`` always.
  """
  counts_a = jnp.asarray(counts, jnp.int32)
  coarsest = counts_a[-1]
  k = valid.shape[1]
  left = jnp.full(valid.shape[:1], budget, jnp.int32)
  levels = []
  for r in range(k):
    remaining = jnp.sum(valid[:, r + 1 :].astype(jnp.int32), axis=1)
    allowed = left - remaining * coarsest
    fits = counts_a[None, :] <= allowed[:, None]  # [B, L]
    # Finest level that fits (levels are ordered finest first => first True).
    finest = jnp.argmax(fits, axis=1).astype(jnp.int32)
    level = jnp.where(jnp.any(fits, axis=1), finest, jnp.where(coarsest <= left, len(counts) - 1, -1)).astype(jnp.int32)
    level = jnp.where(valid[:, r], level, -1)
    left = left - jnp.where(level >= 0, counts_a[jnp.maximum(level, 0)], 0)
    levels.append(level)
  return jnp.stack(levels, axis=1)


def compact_frame_times(indices: jax.Array, valid: jax.Array) -> jax.Array:
  """Temporal RoPE positions of the selected frames: -1 for the most recent, -2 for the next older, ...

  ``indices`` [B, K] are memory-frame indices (memory is chronological), ``valid`` [B, K] marks real picks.
  Positions depend only on the order of the selected frames, not on how long the history is, so a model trained
  on 2-shot histories sees the same range of positions when it generates shot 10 (design.md).
  """
  later = (indices[:, None, :] > indices[:, :, None]) & valid[:, None, :]  # [B, k, j]: pick j is newer than k
  return -(1.0 + jnp.sum(later, axis=-1).astype(jnp.float32))


def level_positions(latent_hw: tuple[int, int], kernel: Kernel, patch: Sequence[int]) -> np.ndarray:
  """Spatial RoPE positions [n, 2] of a level's tokens: region centres in full-resolution DiT-token units."""
  gh, gw = level_grid(latent_hw, kernel)
  sh, sw = kernel[1] / patch[1], kernel[2] / patch[2]
  ii, jj = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
  pos = np.stack([(ii + 0.5) * sh - 0.5, (jj + 0.5) * sw - 0.5], axis=-1)
  return pos.reshape(-1, 2).astype(np.float32)


def pack_tokens(
    tokens: jax.Array, positions: jax.Array, levels: jax.Array, counts: Sequence[int], budget: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Gathers each frame's tokens at its level into a static [B, budget] buffer.

  Args:
    tokens: [B, K, S, D], every frame's tokens at every level, levels concatenated (S = sum(counts)).
    positions: [B, K, S, 3] matching RoPE positions.
    levels: int32 [B, K] from :func:`allocate_patchifiers`.
  Returns:
    (tokens [B, budget, D], positions [B, budget, 3], mask [B, budget] bool), frames in rank order.
  """
  b, k, s, d = tokens.shape
  counts_a = jnp.asarray(counts, jnp.int32)
  offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts_a)[:-1]])
  n = jnp.where(levels >= 0, counts_a[jnp.maximum(levels, 0)], 0)  # [B, K]
  ends = jnp.cumsum(n, axis=1)  # [B, K]
  slots = jnp.arange(budget, dtype=jnp.int32)
  frame = jax.vmap(lambda e: jnp.searchsorted(e, slots, side="right"))(ends)  # [B, budget]
  frame = jnp.minimum(frame, k - 1)
  start = jnp.take_along_axis(ends - n, frame, axis=1)
  level = jnp.maximum(jnp.take_along_axis(levels, frame, axis=1), 0)
  src = frame * s + offsets[level] + (slots[None, :] - start)
  mask = slots[None, :] < ends[:, -1:]
  src = jnp.where(mask, src, 0)
  flat_t = tokens.reshape(b, k * s, d)
  flat_p = positions.reshape(b, k * s, 3)
  out_t = jnp.take_along_axis(flat_t, src[..., None], axis=1)
  out_p = jnp.take_along_axis(flat_p, src[..., None], axis=1)
  out_t = jnp.where(mask[..., None], out_t, 0)
  out_p = jnp.where(mask[..., None], out_p, 0)
  return out_t, out_p, mask


class Patchifier(nn.Module):
  """One ``P_l``: a per-frame (1, kh, kw) convolution with stride = kernel, as a patch reshape + matmul."""

  kernel: Kernel
  dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, frames: jax.Array) -> jax.Array:
    """frames [B, K, h, w, C] -> tokens [B, K, n, D]."""
    _, kh, kw = self.kernel
    h, w, c = frames.shape[2:]
    gh, gw = math.ceil(h / kh), math.ceil(w / kw)
    x = jnp.pad(frames, ((0, 0), (0, 0), (0, gh * kh - h), (0, gw * kw - w), (0, 0)))
    x = einops.rearrange(x, "b k (gh kh) (gw kw) c -> b k (gh gw) kh kw c", kh=kh, kw=kw)
    kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(
            nn.initializers.lecun_normal(in_axis=(0, 1, 2, 3), out_axis=4), (None, None, None, "conv_in", "embed")
        ),
        (1, kh, kw, c, self.dim),
    )
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)), (self.dim,))
    out = jnp.einsum(
        "bnxyc,xycd->bnd", x.reshape((-1,) + x.shape[2:]).astype(self.dtype), kernel[0].astype(self.dtype)
    ) + bias.astype(self.dtype)
    return out.reshape(x.shape[:3] + (self.dim,))


class AdaptiveConditioner(nn.Module):
  """Eq. 7: importance-guided patchification of the selected memory frames into ``N_c <= budget`` tokens."""

  kernels: tuple[Kernel, ...]
  patch: tuple[int, int, int]
  dim: int
  budget: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, frames: jax.Array, valid: jax.Array, frame_time: jax.Array):
    """Builds context tokens.

    Args:
      frames: [B, K, h, w, C] selected raw latent frames, best first (M_hat of Eq. 6).
      valid: bool [B, K], whether each selected frame is a real memory frame.
      frame_time: float [B, K], temporal RoPE position of each frame (negative: before the current shot).
    Returns:
      dict with ``tokens`` [B, N_c, D], ``positions`` [B, N_c, 3], ``mask`` [B, N_c] and ``levels`` [B, K]
      (patchifier index per selected frame, -1 = dropped).
    """
    hw = frames.shape[2:4]
    counts = tokens_per_level(hw, self.kernels)
    levels = allocate_patchifiers(valid, counts, self.budget)
    toks, poss = [], []
    for i, kern in enumerate(self.kernels):
      toks.append(Patchifier(kern, self.dim, self.dtype, name=f"patchifier_{i}")(frames))
      sp = jnp.asarray(level_positions(hw, kern, self.patch))  # [n, 2]
      t = jnp.broadcast_to(frame_time[:, :, None, None], frame_time.shape + (sp.shape[0], 1))
      poss.append(jnp.concatenate([t.astype(jnp.float32), jnp.broadcast_to(sp, t.shape[:3] + (2,))], axis=-1))
    tokens, positions, mask = pack_tokens(
        jnp.concatenate(toks, axis=2), jnp.concatenate(poss, axis=2), levels, counts, self.budget
    )
    tokens = nn.with_logical_constraint(tokens, ("batch", "ctx", "embed"))
    return dict(tokens=tokens, positions=positions, mask=mask, levels=levels)


def init_patchifiers_from_patch_embedding(
    patch_kernel: jax.Array, kernels: Sequence[Kernel], latent_channels: int
) -> list[jax.Array]:
  """FramePack-style initialisation of the patchifiers from the DiT's patch embedding.

  ``patch_kernel`` is the DiT's (pt, ph, pw, C_in, D) kernel; only its first ``latent_channels`` input channels see
  the clean latent. A level with kernel (1, a*ph, b*pw) tiles the base kernel ``a x b`` times and divides by
  ``a * b``, so a spatially constant input yields the same token as the base patchifier. Used when a pretrained DiT
  is loaded (the trainer, under ``jit`` on sharded arrays); returned kernels have shape (1, kh, kw, latent_channels,
  D).
  """
  base = jnp.asarray(patch_kernel)[:1, :, :, :latent_channels, :]
  pt, ph, pw = patch_kernel.shape[:3]
  del pt
  out = []
  for k in kernels:
    a, b = k[1] // ph, k[2] // pw
    if a * ph != k[1] or b * pw != k[2]:
      raise ValueError(f"conditioner.kernels: {k} is not a multiple of the DiT patch {(1, ph, pw)}")
    out.append(jnp.tile(base, (1, a, b, 1, 1)) / float(a * b))
  return out
