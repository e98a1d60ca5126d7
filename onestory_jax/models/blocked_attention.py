"""Blocked (flash-style) softmax attention in plain JAX: the ``'blocked'`` backend of :mod:`.attention`.

``softmax(q k^T / sqrt(D)) v`` without ever holding the ``[B, H, Lq, Lk]`` scores. XLA's own attention
(``jax.nn.dot_product_attention(implementation='xla')``) materialises them and streams them through memory several
times; on a 2-core CPU at 2,048 tokens that is ~3.5x slower than this kernel, forward and backward, and its
temporaries grow with ``Lq * Lk``.

Algorithm:

* **Online softmax over key blocks** (Milakov & Gimelshein 2018, arXiv 1805.02867; FlashAttention, Dao et al. 2022,
  arXiv 2205.14135). Keys and values are cut into blocks of ``block_k``; a ``lax.scan`` over the blocks carries, per
  query row, the running maximum ``m``, the running normaliser ``l`` and the unnormalised output ``acc``. Each step
  computes the scores of *all* queries of the chunk against one key block, ``m' = max(m, rowmax(s))``,
  ``p = exp(s - m')``, ``l = l e^{m - m'} + rowsum(p)``, ``acc = acc e^{m - m'} + p v``; at the end
  ``o = acc / l``. Only a ``[N, Lq_chunk, block_k]`` score block is live at a time.
* **Custom VJP that stores only the output and the per-row log-sum-exp** ``lse = m + log l``. The backward pass
  recomputes the scores block by block: ``p = exp(s - lse)`` (exact probabilities, no renormalising), then with
  ``delta = rowsum(dO * O)``: ``dV += p^T dO``, ``dP = dO V^T``, ``dS = p * (dP - delta)``, ``dQ += dS K``,
  ``dK += dS^T Q`` (each scaled by ``1/sqrt(D)`` where the logits were). The backward scan also runs over key
  blocks, so ``dK`` and ``dV`` of a block are complete in the step that computes them and only ``dQ`` is carried.
* **Heads-major layout.** Inside, tensors are ``[N, L, D]`` with ``N = B * H`` (one transpose in, one out), and key
  blocks block-major ``[num_blocks, N, block_k, D]``, so every matmul is a batched matmul over ``N`` whose operands
  are contiguous. The backward computes the transposed scores ``s^T = K_blk Q^T`` (``[N, block_k, Lq]``): then
  ``dV = p^T dO`` and ``dK = dS^T Q`` are plain (row-major, contraction over the minor axis) matmuls, and ``dQ`` is
  accumulated transposed, ``dQ^T += K_blk^T dS^T``. Matmuls that contract a non-minor axis of a large operand
  (``p^T dO`` from ``p [Lq, block_k]``) fall off XLA:CPU's fast matmul path and run 2-3x slower.
* **Base-2 exponentials.** The logits are taken in base 2 (scaled by ``log2(e) / sqrt(D)``, folded into float32
  ``q`` once), so the kernel exponentiates with ``exp2`` and keeps ``lse`` in base 2; the gradients carry the
  matching ``ln 2``.
* **Concurrency on CPU.** XLA:CPU runs each elementwise fusion on one thread but runs independent operations of a
  step at the same time. Each step therefore processes ``groups`` independent slices of ``N`` (up to four), so the
  exponentials of one slice overlap the matmuls of another.
* **Block sizes per shape** (:func:`plan`): ``round(Lk / BLOCK_K)`` equal key blocks (at least one), each rounded
  up to a multiple of 8, so a block holds 0.8 to 1.3 x :data:`BLOCK_K` keys and the padding is small (128 x 16 at
  2,048 keys, 160 x 2 at 320); a sequence of up to 1.5 x ``BLOCK_K`` keys is one block (an exact softmax, no
  rescaling). Queries are processed all at once unless the score block would exceed :data:`SCORE_BLOCK_BYTES`; then
  they are split into equal chunks (an outer ``lax.map`` / ``lax.scan``). The defaults are the fastest measured on a
  2-core XLA:CPU host (``python -m onestory_jax.attention_benchmark``): key blocks of 64, 96, 256 and 512 and query
  chunks of 512-1,024 were slower at 2,048 tokens (larger score blocks fall out of cache, smaller matmuls lose
  efficiency), and one 320-key block was slower than two of 160 at the demo shape.

Padding: the key sequence is padded to a whole number of blocks (padded keys are masked) and the query sequence to a
whole number of chunks (padded queries dropped). Key padding given by the caller (``key_mask`` [B, Lk] bool,
``kv_lengths`` [B] int: key ``j`` takes part iff ``key_mask[b, j]`` and ``j < kv_lengths[b]``, the semantics of
:func:`key_valid`) becomes an additive ``0 / -inf`` bias on the scores. A query whose keys are all padding gets
a zero output and zero gradients (never NaN).

Precision: float32 inputs are computed in float32 throughout and agree with the float32 reference up to summation
order (~1e-6 relative). When q, k and v are all bfloat16 the matmuls take bfloat16 operands with float32
accumulation (q, k, v as given; the probabilities and ``dS`` rounded to bfloat16 for the second matmuls, as
FlashAttention does), the scale goes on the float32 scores rather than being rounded into ``q``, and the softmax
statistics and accumulators stay float32: ~1.7x faster on a CPU with bfloat16 matmul units than computing in
float32, and as accurate as the bfloat16 output can hold. Any other dtype (float16, mixed) is computed in float32.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

# Target key block (keys per scan step); see "Block sizes per shape" in the module docstring.
BLOCK_K = 128
# Upper bound on one float32 score block [N, Lq_chunk, block_k]; larger query sets are split into chunks.
SCORE_BLOCK_BYTES = 16 * 2**20
# Independent slices of N per step (XLA:CPU overlaps their single-threaded elementwise work).
GROUPS = 4

_LOG2E = 1.0 / math.log(2.0)
_LN2 = math.log(2.0)


class Plan(NamedTuple):
  """Static tiling of one attention call (:func:`plan`)."""

  block_k: int  # keys per block
  num_k: int  # key blocks; Lk is padded to block_k * num_k
  chunk_q: int  # queries per chunk
  num_q: int  # query chunks; Lq is padded to chunk_q * num_q
  groups: int  # independent slices of N = B * H per step


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def plan(
    n: int,
    lq: int,
    lk: int,
    *,
    block_k: int = BLOCK_K,
    score_block_bytes: int = SCORE_BLOCK_BYTES,
    groups: int = GROUPS,
) -> Plan:
  """Block sizes for ``n = B * H`` rows of ``lq`` queries against ``lk`` keys.

  Keys: ``round(lk / block_k)`` blocks (at least one) of equal size rounded up to a multiple of 8; one block is
  exactly ``lk`` keys. Queries: all in one chunk unless the float32 score block ``n * lq * bk * 4`` exceeds
  ``score_block_bytes``, then equal chunks (multiples of 8) that fit. Groups: the largest of
  ``groups, groups/2, ..., 1`` that divides ``n``.
  """
  nk = max(1, round(lk / block_k))
  if nk == 1:
    bk = lk
  else:
    bk = _round_up(-(-lk // nk), 8)
    nk = -(-lk // bk)
  per_query = n * bk * 4
  if lq * per_query <= score_block_bytes:
    cq, nq = lq, 1
  else:
    cq = max(8, (score_block_bytes // per_query) // 8 * 8)
    nq = -(-lq // cq)
    cq = _round_up(-(-lq // nq), 8)
    nq = -(-lq // cq)
  g = max(1, groups)
  while n % g:
    g //= 2
  return Plan(bk, nk, cq, nq, max(g, 1))


# ------------------------------------------------------------------------------------------------ layout


def _split(a: Array, g: int) -> tuple[Array, ...]:
  return tuple(jnp.split(a, g, axis=0)) if g > 1 else (a,)


def _cat(parts) -> Array:
  parts = list(parts)
  return jnp.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]


def _mm(eq: str, a: Array, b: Array) -> Array:
  """A batched matmul accumulating (and returning) float32, whatever the operand dtype."""
  return jnp.einsum(eq, a, b, preferred_element_type=jnp.float32)


def _to_heads(x: Array, length: int, dtype, scale: float | None = None) -> Array:
  """[B, L, H, D] -> [B * H, length, D] in ``dtype`` (zero-padded to ``length``), optionally scaled in float32."""
  b, l, h, d = x.shape
  if scale is not None:
    x = x.astype(jnp.float32) * scale
  x = x.astype(dtype)
  x = jnp.swapaxes(x, 1, 2)
  if length > l:
    x = jnp.pad(x, ((0, 0), (0, 0), (0, length - l), (0, 0)))
  return x.reshape(b * h, length, d)


def _to_blocks(x: Array, p: Plan, dtype) -> Array:
  """[B, Lk, H, D] -> [num_k, B * H, block_k, D] in ``dtype`` (zero-padded keys)."""
  b, l, h, d = x.shape
  lp = p.block_k * p.num_k
  x = x.astype(dtype)
  if lp > l:
    x = jnp.pad(x, ((0, 0), (0, lp - l), (0, 0), (0, 0)))
  return x.reshape(b, p.num_k, p.block_k, h, d).transpose(1, 0, 3, 2, 4).reshape(p.num_k, b * h, p.block_k, d)


def _from_blocks(x: Array, b: int, h: int, l: int) -> Array:
  """[num_k, B * H, block_k, D] -> [B, l, H, D] (padding dropped)."""
  nk, _, bk, d = x.shape
  x = x.reshape(nk, b, h, bk, d).transpose(1, 0, 3, 2, 4).reshape(b, nk * bk, h, d)
  return x[:, :l]


def _chunks(x: Array, p: Plan) -> Array:
  """[N, Lq_padded, ...] -> [num_q, N, chunk_q, ...]."""
  n = x.shape[0]
  return jnp.moveaxis(x.reshape((n, p.num_q, p.chunk_q) + x.shape[2:]), 1, 0)


def _unchunks(x: Array) -> Array:
  """[num_q, N, chunk_q, ...] -> [N, num_q * chunk_q, ...]."""
  nq, n, cq = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape((n, nq * cq) + x.shape[3:])


def key_valid(key_mask: Array | None, kv_lengths: Array | None, lk: int) -> Array | None:
  """``[B, Lk]`` bool of the keys that take part, or None when every key does (every backend's key padding:
  key ``j`` of example ``b`` takes part iff ``key_mask[b, j]`` and ``j < kv_lengths[b]``)."""
  valid = None if key_mask is None else key_mask.astype(bool)
  if kv_lengths is not None:
    by_length = jnp.arange(lk)[None, :] < kv_lengths[:, None]
    valid = by_length if valid is None else valid & by_length
  return valid


# ------------------------------------------------------------------------------------------------ forward


def _forward_chunk(
    qh: Array, kb: Array, vb: Array, bias: Array | None, groups: int, scale: float | None
) -> tuple[Array, Array]:
  """One query chunk. ``qh`` [N, Lq, D]; ``kb``/``vb`` [nk, N, bk, D]; ``bias`` [nk, N, bk] (0 / -inf) or None.
  The base-2 logits are ``qh k^T`` (``qh`` pre-scaled by log2(e)/sqrt(D), ``scale`` None) or ``scale * qh k^T``.
  Returns float32 ``o`` [N, Lq, D] and base-2 ``lse`` [N, Lq] (+inf for a row without valid keys)."""
  nk, n_all, _, d = kb.shape
  lq = qh.shape[1]
  masked = bias is not None
  qs = _split(qh, groups)

  def safe(m):  # the reference point of a row that has seen no valid key yet
    return jnp.where(m == -jnp.inf, 0.0, m) if masked else m

  def scores(qg, kk, bb):
    s = _mm("nqd,nkd->nqk", qg, kk)
    if scale is not None:
      s = s * scale
    return s if bb is None else s + bb[:, None, :]

  def block(kk, vv, bb):
    ks, vs = _split(kk, groups), _split(vv, groups)
    bs = _split(bb, groups) if masked else (None,) * groups
    return ks, vs, bs

  if nk == 1:  # one key block: an exact softmax, no rescaling
    ks, vs, bs = block(kb[0], vb[0], None if bias is None else bias[0])
    res = []
    for g in range(groups):
      s = scores(qs[g], ks[g], bs[g])
      m = safe(jnp.max(s, axis=-1))
      pr = jnp.exp2(s - m[..., None])
      res.append((m, jnp.sum(pr, axis=-1), _mm("nqk,nkd->nqd", pr.astype(vb.dtype), vs[g])))
  else:
    n = n_all // groups

    def step(carry, kk, vv, bb, qg):
      m, l, acc = carry
      s = scores(qg, kk, bb)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      ms = safe(m_new)
      pr = jnp.exp2(s - ms[..., None])
      alpha = jnp.exp2(m - ms)
      pv = _mm("nqk,nkd->nqd", pr.astype(vv.dtype), vv)
      return m_new, l * alpha + jnp.sum(pr, axis=-1), acc * alpha[..., None] + pv

    def body(carry, xs):
      ks, vs, bs = block(*xs)
      return tuple(step(carry[g], ks[g], vs[g], bs[g], qs[g]) for g in range(groups)), None

    init = tuple(
        (
            jnp.full((n, lq), -jnp.inf, jnp.float32),
            jnp.zeros((n, lq), jnp.float32),
            jnp.zeros((n, lq, d), jnp.float32),
        )
        for _ in range(groups)
    )
    res, _ = jax.lax.scan(body, init, (kb, vb, bias))
  m, l, acc = (_cat(r[i] for r in res) for i in range(3))
  if not masked:
    return acc / l[..., None], m + jnp.log2(l)
  empty = l == 0.0
  l1 = jnp.where(empty, 1.0, l)
  return acc / l1[..., None], jnp.where(empty, jnp.inf, safe(m) + jnp.log2(l1))


# ------------------------------------------------------------------------------------------------ backward


def _backward_chunk(qh, kb, vb, bias, lse, doh, delta, groups, scale):
  """One query chunk (arguments as :func:`_forward_chunk`; ``doh`` [N, Lq, D], ``delta`` = rowsum(dO * O)).
  Returns float32 ``dqT`` [N, D, Lq], ``dkb`` and ``dvb`` [nk, N, bk, D] with ``dS = p * (dP - delta)`` in place of
  the logit gradient: ``dqT = K^T dS^T``, ``dkb = dS^T qh``, ``dvb = p^T dO`` (the caller applies the scales)."""
  nk, n_all, _, d = kb.shape
  lq = qh.shape[1]
  masked = bias is not None
  n = n_all // groups
  qs, dos, lses, deltas = _split(qh, groups), _split(doh, groups), _split(lse, groups), _split(delta, groups)

  def step(g, dqt, kk, kt, vv, bb):
    st = _mm("nkd,nqd->nkq", kk, qs[g])  # transposed scores [n, bk, Lq]
    if scale is not None:
      st = st * scale
    if bb is not None:
      st = st + bb[:, :, None]
    pt = jnp.exp2(st - lses[g][:, None, :])
    dpt = _mm("nkd,nqd->nkq", vv, dos[g])
    dst = pt * (dpt - deltas[g][:, None, :])
    pt, dst = pt.astype(kk.dtype), dst.astype(kk.dtype)
    dv = _mm("nkq,nqd->nkd", pt, dos[g])
    dk = _mm("nkq,nqd->nkd", dst, qs[g])
    dqt = dqt + _mm("ndk,nkq->ndq", kt, dst)
    return dqt, dk, dv

  def body(dqts, xs):
    kk, kt, vv, bb = xs
    ks, kts, vs = _split(kk, groups), _split(kt, groups), _split(vv, groups)
    bs = _split(bb, groups) if masked else (None,) * groups
    out = [step(g, dqts[g], ks[g], kts[g], vs[g], bs[g]) for g in range(groups)]
    return tuple(o[0] for o in out), (_cat(o[1] for o in out), _cat(o[2] for o in out))

  # K^T blocks as a scanned input (a transpose inside the step would be folded into a slow matmul form).
  kt = jnp.swapaxes(kb, 2, 3)
  init = tuple(jnp.zeros((n, d, lq), jnp.float32) for _ in range(groups))
  if nk == 1:
    dqts, (dk, dv) = body(init, (kb[0], kt[0], vb[0], None if bias is None else bias[0]))
    return _cat(dqts), dk[None], dv[None]
  dqts, (dkb, dvb) = jax.lax.scan(body, init, (kb, kt, vb, bias))
  return _cat(dqts), dkb, dvb


# ------------------------------------------------------------------------------------------------ custom VJP


class _Static(NamedTuple):
  """The static part of one call: the tiling, the key length and dtype, and the matmul operand dtype."""

  plan: Plan
  lk: int
  k_dtype: jnp.dtype
  mm_dtype: jnp.dtype  # bfloat16 when q, k, v all are (float32 accumulation), else float32


def _prepare(q, k, v, bias, st: _Static):
  """Heads-major q (pre-scaled to base-2 logits in float32; unscaled in bfloat16, where the scale goes on the
  float32 scores instead of rounding ``q * scale`` to bfloat16), block-major k, v and bias; the score scale."""
  b, lq, h, d = q.shape
  p = st.plan
  c = _LOG2E / math.sqrt(d)
  low = st.mm_dtype != jnp.float32
  qh = _to_heads(q, p.chunk_q * p.num_q, st.mm_dtype, None if low else c)
  kb, vb = _to_blocks(k, p, st.mm_dtype), _to_blocks(v, p, st.mm_dtype)
  bb = None
  if bias is not None:  # [B, Lk_padded] -> [nk, B * H, bk]
    bb = jnp.broadcast_to(bias.reshape(b, 1, p.num_k, p.block_k), (b, h, p.num_k, p.block_k))
    bb = bb.transpose(2, 0, 1, 3).reshape(p.num_k, b * h, p.block_k)
  return qh, kb, vb, bb, (c if low else None)


def _forward(q, k, v, bias, st: _Static):
  b, lq, h, d = q.shape
  p = st.plan
  qh, kb, vb, bb, scale = _prepare(q, k, v, bias, st)
  if p.num_q == 1:
    oh, lse = _forward_chunk(qh, kb, vb, bb, p.groups, scale)
  else:
    oh, lse = jax.lax.map(lambda qc: _forward_chunk(qc, kb, vb, bb, p.groups, scale), _chunks(qh, p))
    oh, lse = _unchunks(oh), _unchunks(lse)
  o = jnp.swapaxes(oh[:, :lq].reshape(b, h, lq, d), 1, 2).astype(q.dtype)
  return o, (qh, kb, vb, bb, lse)


def _backward(st: _Static, res, o, do):
  b, lq, h, d = do.shape
  p = st.plan
  qh, kb, vb, bb, lse = res
  low = st.mm_dtype != jnp.float32
  scale = _LOG2E / math.sqrt(d) if low else None
  lqp = p.chunk_q * p.num_q
  doh = _to_heads(do, lqp, st.mm_dtype)
  # rowsum(dO * O) [B, Lq, H], as a dot: XLA:CPU's reduction of this rank-4 product is ~20x slower.
  delta = jnp.einsum("blhd,blhd->blh", do.astype(jnp.float32), o.astype(jnp.float32))
  delta = jnp.swapaxes(delta, 1, 2)
  if lqp > lq:
    delta = jnp.pad(delta, ((0, 0), (0, 0), (0, lqp - lq)))
  delta = delta.reshape(b * h, lqp)
  if p.num_q == 1:
    dqt, dkb, dvb = _backward_chunk(qh, kb, vb, bb, lse, doh, delta, p.groups, scale)
  else:

    def body(acc, xs):
      qc, lc, dc, ec = xs
      dqt, dkb, dvb = _backward_chunk(qc, kb, vb, bb, lc, dc, ec, p.groups, scale)
      return (acc[0] + dkb, acc[1] + dvb), dqt

    xs = (_chunks(qh, p), _chunks(lse, p), _chunks(doh, p), _chunks(delta, p))
    zeros = jnp.zeros(kb.shape, jnp.float32)
    (dkb, dvb), dqt = jax.lax.scan(body, (zeros, zeros), xs)
    dqt = jnp.moveaxis(dqt, 0, 2).reshape(b * h, d, lqp)  # [nq, N, D, cq] -> [N, D, Lq_padded]
  # Base-2 logits s2 = c q.k with c = log2(e)/sqrt(D), p = 2^(s2 - lse): dL/ds2 = ln2 * dS, so
  # dq = c ln2 dS K = dS K / sqrt(D), and dk = ln2 dS^T (c q) (q pre-scaled) or dS^T q / sqrt(D) (unscaled).
  dq = jnp.transpose((dqt[:, :, :lq] * (1.0 / math.sqrt(d))).reshape(b, h, d, lq), (0, 3, 1, 2))
  dk = _from_blocks(dkb * (1.0 / math.sqrt(d) if low else _LN2), b, h, st.lk)
  dv = _from_blocks(dvb, b, h, st.lk)
  return dq.astype(do.dtype), dk.astype(st.k_dtype), dv.astype(st.k_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(q, k, v, bias, static: _Static):
  return _forward(q, k, v, bias, static)[0]


def _attend_fwd(q, k, v, bias, static: _Static):
  o, res = _forward(q, k, v, bias, static)
  return o, (res, o)


def _attend_bwd(static: _Static, residuals, do):
  res, o = residuals
  dq, dk, dv = _backward(static, res, o, do)
  return dq, dk, dv, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def blocked_attention(
    q: Array,
    k: Array,
    v: Array,
    key_mask: Array | None = None,
    kv_lengths: Array | None = None,
    *,
    block_k: int = BLOCK_K,
    score_block_bytes: int = SCORE_BLOCK_BYTES,
    groups: int = GROUPS,
) -> Array:
  """Softmax attention by blocks (module docstring): the ``'blocked'`` attention backend.

  Args:
    q: ``[B, Lq, H, D]``.
    k: ``[B, Lk, H, D]``.
    v: ``[B, Lk, H, D]``.
    key_mask: optional ``[B, Lk]`` bool, False = padding key.
    kv_lengths: optional ``[B]`` int, keys at positions ``>= kv_lengths[b]`` are padding.
    block_k, score_block_bytes, groups: tiling knobs (:func:`plan`); the defaults are the measured best on CPU.

  Returns:
    ``[B, Lq, H, D]`` in ``q.dtype``; zeros for a query without valid keys.
  """
  b, lq, h, _ = q.shape
  lk = k.shape[1]
  p = plan(b * h, lq, lk, block_k=block_k, score_block_bytes=score_block_bytes, groups=groups)
  valid = key_valid(key_mask, kv_lengths, lk)
  lkp = p.block_k * p.num_k
  if valid is None and lkp > lk:
    valid = jnp.ones((b, lk), bool)
  bias = None
  if valid is not None:
    valid = jnp.pad(valid, ((0, 0), (0, lkp - lk)))
    bias = jnp.where(valid, 0.0, -jnp.inf).astype(jnp.float32)
  low = all(jnp.dtype(x.dtype) == jnp.bfloat16 for x in (q, k, v))
  mm_dtype = jnp.dtype(jnp.bfloat16 if low else jnp.float32)
  return _attend(q, k, v, bias, _Static(p, lk, jnp.dtype(k.dtype), mm_dtype))


__all__ = ["blocked_attention", "plan", "Plan", "BLOCK_K", "SCORE_BLOCK_BYTES", "GROUPS"]
