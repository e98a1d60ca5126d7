"""3D rotary position embedding (RoPE) of the Wan2.1 DiT, with float positions.

Wan2.1 splits every attention head of width ``d`` into three groups of channels, one per
axis of the latent patch grid: ``t = d - 4 * (d // 6)`` channels for time and
``2 * (d // 6)`` channels each for height and width. Along an axis with ``c`` channels the
inverse frequencies are ``theta ** (-arange(0, c, 2) / c)``, and a token at position ``p``
rotates channel pair ``i`` by the angle ``p * inv_freq[i]``. Pairs are *interleaved*:
channels ``(2i, 2i + 1)`` form pair ``i``, and the per-pair angles are concatenated as
``[t-angles, h-angles, w-angles]``.

Wan's reference code reads cos/sin from a fixed table indexed by integer grid positions.
OneStory (paper Sec. 4.3, Eq. 8) appends context tokens X = [N, C] whose positions need not
be grid indices (the history is placed at negative times, coarse patches sit at the centres
of the regions they cover), so here positions are float arrays ``[B, L, 3]`` and cos/sin are
computed from them on the fly. At integer positions this is exactly Wan's table.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def rope_split(head_dim: int) -> tuple[int, int, int]:
  """Channels of one head given to the (t, h, w) axes; e.g. 128 -> (44, 42, 42)."""
  if not isinstance(head_dim, (int, np.integer)) or head_dim < 6 or head_dim % 2:
    raise ValueError(
        f"rope: head_dim must be an even integer >= 6 (3D RoPE rotates channel pairs on 3 axes); " f"got {head_dim!r}"
    )
  hw = 2 * (head_dim // 6)
  return head_dim - 2 * hw, hw, hw


def rope_inv_freq(head_dim: int, theta: float = 10000.0) -> np.ndarray:
  """Inverse frequencies of the ``head_dim // 2`` channel pairs, as ``[3, head_dim // 2]``.

  Row ``a`` holds axis ``a``'s inverse frequencies in that axis's pair slots and zeros
  elsewhere, so ``angles = positions @ table`` gives the concatenated per-pair angles.
  """
  if theta <= 0:
    raise ValueError(f"rope: theta must be positive; got {theta!r}")
  table = np.zeros((3, head_dim // 2), np.float64)
  start = 0
  for axis, c in enumerate(rope_split(head_dim)):
    inv = 1.0 / (theta ** (np.arange(0, c, 2, dtype=np.float64) / c))
    table[axis, start : start + c // 2] = inv
    start += c // 2
  return table


def rope_angles(positions: jax.Array, head_dim: int, theta: float = 10000.0) -> tuple[jax.Array, jax.Array]:
  """cos and sin of the rotation angles for float (t, h, w) positions.

  Args:
    positions: ``[B, L, 3]`` float positions (time, height, width) in patch-grid units.
    head_dim: width of one attention head.
    theta: RoPE base.

  Returns:
    ``(cos, sin)``, each ``[B, L, head_dim // 2]`` float32.
  """
  positions = jnp.asarray(positions)
  if positions.ndim != 3 or positions.shape[-1] != 3:
    raise ValueError(f"rope_angles: positions must have shape [B, L, 3]; got {positions.shape}")
  inv = rope_inv_freq(head_dim, theta)
  pos = positions.astype(jnp.float32)
  # Each pair slot has exactly one nonzero row in `inv`, so a broadcast-and-sum is exact
  # (no matmul precision loss).
  angles = sum(pos[..., a : a + 1] * jnp.asarray(inv[a], jnp.float32) for a in range(3))
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates interleaved channel pairs of ``x`` [B, L, H, Dh] by the given angles.

  ``out[2i] = x[2i] cos_i - x[2i+1] sin_i`` and ``out[2i+1] = x[2i] sin_i + x[2i+1] cos_i``;
  computed in float32 and returned in ``x.dtype``.
  """
  if x.ndim != 4:
    raise ValueError(f"apply_rope: x must have shape [B, L, H, Dh]; got {x.shape}")
  b, l, _, dh = x.shape
  if dh % 2 or cos.shape[-1] != dh // 2 or cos.shape != sin.shape or cos.shape[-2] != l:
    raise ValueError(
        f"apply_rope: cos/sin must have shape [B, L, Dh/2] = [{b}, {l}, {dh // 2}]; "
        f"got cos {cos.shape}, sin {sin.shape}"
    )
  xf = x.astype(jnp.float32).reshape(*x.shape[:-1], dh // 2, 2)
  x_even, x_odd = xf[..., 0], xf[..., 1]
  c = cos[:, :, None, :].astype(jnp.float32)
  s = sin[:, :, None, :].astype(jnp.float32)
  out = jnp.stack([x_even * c - x_odd * s, x_even * s + x_odd * c], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


def grid_positions(f: int, h: int, w: int) -> jax.Array:
  """Integer (t, h, w) positions of an ``f x h x w`` patch grid in raster order, ``[f*h*w, 3]`` float32."""
  for name, n in (("f", f), ("h", h), ("w", w)):
    if not isinstance(n, (int, np.integer)) or n < 1:
      raise ValueError(f"grid_positions: {name} must be a positive integer; got {n!r}")
  grid = np.stack(np.meshgrid(np.arange(f), np.arange(h), np.arange(w), indexing="ij"), axis=-1)
  return jnp.asarray(grid.reshape(-1, 3), jnp.float32)
