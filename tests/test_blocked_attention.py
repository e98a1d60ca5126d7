"""The blocked (flash-style) attention kernel, ``onestory_jax.models.blocked_attention``.

Values and gradients (dq, dk, dv of a scalar loss) are compared with the plain float32 softmax
``attention.reference_attention``. Tolerance: the kernel differs from the reference only in summation order, in
where the 1/sqrt(D) scale is applied and in base-2 exponentials; measured errors are ~1e-6 of the output / gradient
scale, so the bound is 1e-5 of ``max(1, max |reference|)``. A wrong mask, a wrong block offset or a dropped rescale
gives errors of order 1e-2 or more. Small block sizes (``block_k``, ``score_block_bytes``) make the short test
sequences run the multi-block and multi-chunk paths, with lengths that are no multiple of the blocks.

The Ulysses context-parallel runs on 8 simulated devices are in ``tests/test_attention.py`` (parametrized over the
backends, 'blocked' included).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onestory_jax.models import attention
from onestory_jax.models import blocked_attention as blocked_lib

B, H, D = 2, 4, 16
TOL = 1e-5
KINDS = ("none", "mask", "lengths", "both")


def _qkv(lq, lk, seed=0, dtype=jnp.float32, b=B, h=H, d=D):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, lq, h, d))
  k, v = rng.standard_normal((2, b, lk, h, d))
  return tuple(jnp.asarray(a, dtype) for a in (q, k, v))


def _padding(lk, kind, b=B):
  """(key_mask, kv_lengths): none, a mask with holes anywhere, suffix lengths, or both at once."""
  mask = lengths = None
  if kind in ("mask", "both"):
    m = np.random.default_rng(1).uniform(size=(b, lk)) > 0.4
    m[:, 0] = True  # every query keeps at least one key
    mask = jnp.asarray(m)
  if kind in ("lengths", "both"):
    lengths = jnp.asarray([lk - 13] + [lk] * (b - 1), jnp.int32)
  return mask, lengths


def _loss(fn):
  return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v).astype(jnp.float32)))


def _err(a, b):
  """Max abs difference relative to the reference's scale (at least 1)."""
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return float(jnp.max(jnp.abs(a - b))) / max(1.0, float(jnp.max(jnp.abs(b))))


def _check(lq, lk, kind, tol=TOL, dtype=jnp.float32, grad_tol=None, **knobs):
  q, k, v = _qkv(lq, lk, dtype=dtype)
  mask, lengths = _padding(lk, kind)
  ours = lambda q, k, v: blocked_lib.blocked_attention(q, k, v, mask, lengths, **knobs)
  ref = lambda q, k, v: attention.reference_attention(q, k, v, mask, lengths)
  out = jax.jit(ours)(q, k, v)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert _err(out, ref(q, k, v)) <= tol
  grads = jax.jit(jax.grad(_loss(ours), argnums=(0, 1, 2)))(q, k, v)
  for g, r, x in zip(grads, jax.grad(_loss(ref), argnums=(0, 1, 2))(q, k, v), (q, k, v)):
    assert g.shape == x.shape and g.dtype == x.dtype
    assert _err(g, r) <= (tol if grad_tol is None else grad_tol)
  return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "lq,lk,knobs",
    [
        (80, 80, {}),  # one key block: exact softmax
        (75, 75, dict(block_k=16)),  # 5 blocks of 16, 5 padded keys
        (75, 75, dict(block_k=16, score_block_bytes=B * H * 16 * 4 * 24)),  # + 4 query chunks of 24, 21 padded
        (77, 40, dict(block_k=12)),  # cross-attention, Lq > Lk
        (40, 77, dict(block_k=12, groups=1)),  # cross-attention, Lq < Lk
    ],
    ids=["one-block", "blocks", "blocks+chunks", "cross-long-q", "cross-long-k"],
)
def test_matches_reference(lq, lk, knobs, kind):
  out = _check(lq, lk, kind, **knobs)
  if kind != "none":  # the padding is really applied
    assert _err(out, attention.reference_attention(*_qkv(lq, lk))) > 1e-2


def test_the_plans_the_tests_rely_on():
  """The knobs above really give several blocks / chunks / groups; the defaults at the benchmark shapes."""
  assert blocked_lib.plan(B * H, 75, 75, block_k=16) == blocked_lib.Plan(16, 5, 75, 1, 4)
  assert blocked_lib.plan(B * H, 75, 75, block_k=16, score_block_bytes=B * H * 16 * 4 * 24) == (16, 5, 24, 4, 4)
  assert blocked_lib.plan(B * H, 40, 77, block_k=12, groups=1) == (16, 5, 40, 1, 1)
  assert blocked_lib.plan(1 * 8, 2048, 2048) == (128, 16, 2048, 1, 4)  # 2,048 tokens, 8 heads
  assert blocked_lib.plan(8 * 4, 320, 320) == (160, 2, 320, 1, 4)  # the demo DiT's self-attention
  assert blocked_lib.plan(6, 190, 190).num_k == 1  # up to 1.5 blocks: one block, no padding
  assert blocked_lib.plan(6, 190, 190).groups == 2  # the largest power of two <= GROUPS dividing N
  assert blocked_lib.plan(3, 190, 190).groups == 1


def test_the_backend_in_the_registry_is_this_kernel():
  q, k, v = _qkv(70, 70)
  mask, lengths = _padding(70, "both")
  via_registry = attention.dot_product_attention(q, k, v, mask, lengths, backend="blocked")
  np.testing.assert_array_equal(
      np.asarray(via_registry), np.asarray(blocked_lib.blocked_attention(q, k, v, mask, lengths))
  )


def test_queries_without_valid_keys_give_zeros_not_nan():
  """Example 0 has no valid key: its output and all gradients through it are zero (finite); example 1 is exact."""
  q, k, v = _qkv(33, 50)
  mask = jnp.asarray(np.stack([np.zeros(50, bool), np.random.default_rng(2).uniform(size=50) > 0.5]))
  for knobs in ({}, dict(block_k=16)):
    ours = lambda q, k, v, knobs=knobs: blocked_lib.blocked_attention(q, k, v, mask, **knobs)
    out = jax.jit(ours)(q, k, v)
    grads = jax.jit(jax.grad(_loss(ours), argnums=(0, 1, 2)))(q, k, v)
    assert np.all(np.isfinite(np.asarray(out))) and not np.any(np.asarray(out[0]))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    assert all(not np.any(np.asarray(g[0])) for g in grads)
    ref = attention.reference_attention(q[1:], k[1:], v[1:], mask[1:])
    assert _err(out[1:], ref) <= TOL


def test_bfloat16_inputs():
  """bf16 q, k, v: the matmuls take bf16 operands (q, k, v as given; the probabilities and dS rounded to bf16, as
  FlashAttention does) with float32 accumulation, the softmax statistics are float32, and the 1/sqrt(D) scale is
  applied to the float32 scores (not rounded into q). The output is within bf16 rounding (2^-9 relative, bound 2^-8)
  of the float32 reference on the same (bf16-valued) inputs. The gradients differ more (bound 2^-6, measured
  ~5e-3): the loss is evaluated at the bf16-rounded output, so the cotangent already differs by bf16 rounding."""
  _check(75, 75, "both", tol=2**-8, grad_tol=2**-6, dtype=jnp.bfloat16, block_k=16)
  _check(75, 75, "lengths", tol=2**-8, grad_tol=2**-6, dtype=jnp.bfloat16, block_k=16, score_block_bytes=8192)
  _check(40, 77, "mask", tol=2**-8, grad_tol=2**-6, dtype=jnp.bfloat16)


def test_mixed_dtypes_compute_in_float32():
  """float32 queries with bf16 keys/values (or any mix) are computed in float32: gradients keep each input's dtype."""
  q, _, _ = _qkv(30, 30)
  _, k, v = _qkv(30, 30, dtype=jnp.bfloat16)
  fn = lambda q, k, v: blocked_lib.blocked_attention(q, k, v)
  out = jax.jit(fn)(q, k, v)
  assert out.dtype == jnp.float32
  assert _err(out, attention.reference_attention(q, k, v)) <= TOL
  dq, dk, dv = jax.grad(_loss(fn), argnums=(0, 1, 2))(q, k, v)
  assert (dq.dtype, dk.dtype, dv.dtype) == (jnp.float32, jnp.bfloat16, jnp.bfloat16)


def test_vmap_and_jit():
  """A leading vmapped axis (stacked problems) equals running each problem alone, values and gradients."""
  qs, ks, vs = (jnp.stack(x) for x in zip(*(_qkv(45, 45, seed=s) for s in range(3))))
  _, lengths = _padding(45, "lengths")
  fn = functools.partial(blocked_lib.blocked_attention, kv_lengths=lengths, block_k=16)
  batched = jax.jit(jax.vmap(fn))(qs, ks, vs)
  grads = jax.jit(jax.vmap(jax.grad(_loss(fn), argnums=(0, 1, 2))))(qs, ks, vs)
  for i in range(3):
    ref = lambda q, k, v: attention.reference_attention(q, k, v, None, lengths)
    assert _err(batched[i], ref(qs[i], ks[i], vs[i])) <= TOL
    for g, r in zip(grads, jax.grad(_loss(ref), argnums=(0, 1, 2))(qs[i], ks[i], vs[i])):
      assert _err(g[i], r) <= TOL


def test_no_score_matrix_is_materialised():
  """At 2,048 tokens the compiled forward + backward needs a fraction of one [Lq, Lk] float32 score matrix (16 MiB)
  of temporaries, where XLA's attention needs several."""
  q, k, v = _qkv(2048, 2048, b=1, h=1)
  scores = 2048 * 2048 * 4

  def temp_bytes(backend):
    fn = lambda q, k, v: attention.dot_product_attention(q, k, v, backend=backend)
    grad = jax.jit(jax.grad(_loss(fn), argnums=(0, 1, 2)))
    return grad.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

  assert temp_bytes("blocked") < scores / 4
  assert temp_bytes("xla") > 2 * scores
