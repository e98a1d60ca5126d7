"""Attention backends (xla, blocked, splash interpreted, cudnn on GPU) and Ulysses context parallelism on 8 devices.

Every backend is checked against a plain float32 softmax (``attention.reference_attention``), values and
gradients, with and without key padding (a general key mask and suffix lengths). Tolerances: float32 kernels that
differ from the reference only in summation order and in where the 1/sqrt(D) scale is applied agree to ~1e-6; the
bounds below (2e-5) leave room for that, and a wrong mask or a wrong head/sequence swap gives errors of order 1.

The cuDNN test needs an NVIDIA GPU; run it there with
``JAX_PLATFORMS=cuda python -m pytest -q tests/test_attention.py -k cudnn``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from onestory_jax.models import attention
from onestory_jax.models.wan import dit as wan_dit
from tests.helpers import load_config

B, L, LT, H, D = 2, 80, 40, 4, 16
TOL = 2e-5
RULES = load_config("tiny").logical_axis_rules


def _qkv(lq=L, lk=L, h=H, d=D, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((B, lq, h, d))
  k, v = rng.standard_normal((2, B, lk, h, d))
  return tuple(jnp.asarray(a, dtype) for a in (q, k, v))


def _padding(lk, kind):
  """(key_mask, kv_lengths) for: no padding, a general mask (holes anywhere), suffix lengths."""
  if kind == "none":
    return None, None
  if kind == "mask":
    rng = np.random.default_rng(1)
    mask = rng.uniform(size=(B, lk)) > 0.4
    mask[:, 0] = True  # every query keeps at least one key
    return jnp.asarray(mask), None
  return None, jnp.asarray([lk - 13, lk], jnp.int32)


def _loss(fn):
  return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v).astype(jnp.float32)))


def _max_err(a, b):
  return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


def _check_against_reference(backend, lq, lk, kind, tol=TOL, dtype=jnp.float32, d=D):
  q, k, v = _qkv(lq, lk, d=d, dtype=dtype)
  mask, lengths = _padding(lk, kind)
  ours = lambda q, k, v: attention.dot_product_attention(q, k, v, mask, lengths, backend=backend, kv_follows_q=lq == lk)
  ref = lambda q, k, v: attention.reference_attention(q, k, v, mask, lengths)
  out = jax.jit(ours)(q, k, v)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert _max_err(out, ref(q, k, v)) <= tol
  g = jax.jit(jax.grad(_loss(ours), argnums=(0, 1, 2)))(q, k, v)
  g_ref = jax.grad(_loss(ref), argnums=(0, 1, 2))(q, k, v)
  for a, r in zip(g, g_ref):
    assert _max_err(a, r) <= tol * max(1.0, float(jnp.max(jnp.abs(r))))
  return out


@pytest.mark.parametrize("backend", ["xla", "blocked", "splash"])
@pytest.mark.parametrize("kind", ["none", "mask", "lengths"])
def test_backend_matches_reference_self_attention(backend, kind):
  out = _check_against_reference(backend, L, L, kind)
  if kind != "none":  # the padding is really applied
    assert _max_err(out, attention.reference_attention(*_qkv())) > 1e-2


@pytest.mark.parametrize("backend", ["xla", "blocked", "splash"])
def test_backend_matches_reference_cross_attention(backend):
  """Queries and keys of different lengths (the text / image cross-attention); splash pads both to its tiles."""
  _check_against_reference(backend, L, LT, "mask")


def test_pack_valid_first_is_exact_and_identity_on_suffix_padding():
  q, k, v = _qkv()
  mask, _ = _padding(L, "mask")
  lengths, (k_p, v_p) = attention.pack_valid_first(mask, k, v)
  np.testing.assert_array_equal(np.asarray(lengths), np.asarray(mask).sum(1))
  packed = attention.reference_attention(q, k_p, v_p, kv_lengths=lengths)
  assert _max_err(packed, attention.reference_attention(q, k, v, mask)) <= 1e-6
  suffix = jnp.arange(L)[None] < jnp.asarray([[50], [80]])
  _, (k_s,) = attention.pack_valid_first(suffix, k)
  np.testing.assert_array_equal(np.asarray(k_s), np.asarray(k))


def test_unknown_backend_lists_the_registry():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=r"config.model.attention='flash'.*'xla', 'blocked', 'cudnn', 'splash', 'auto'"):
    attention.dot_product_attention(q, k, v, backend="flash")
  with pytest.raises(ValueError, match="config.model.attention='flash'"):
    wan_dit.WanTransformer3D.from_config(load_config("tiny", **{"model.attention": "flash"}).model, 4, 4, 8)


def test_auto_picks_per_platform_and_dtype():
  assert attention.resolve_backend("auto", jnp.bfloat16, "gpu") == "cudnn"
  assert attention.resolve_backend("auto", jnp.float16, "gpu") == "cudnn"
  assert attention.resolve_backend("auto", jnp.float32, "gpu") == "blocked"  # cuDNN flash has no float32
  assert attention.resolve_backend("auto", jnp.bfloat16, "tpu") == "splash"
  assert attention.resolve_backend("auto", jnp.float32, "tpu") == "splash"
  assert attention.resolve_backend("auto", jnp.float32, "cpu") == "blocked"
  assert attention.resolve_backend("auto", jnp.bfloat16, "cpu") == "blocked"
  assert attention.resolve_backend("xla", jnp.float32, "cpu") == "xla"
  assert attention.resolve_backend("splash", jnp.float32, "cpu") == "splash"  # explicit names are kept
  assert attention.current_platform() == jax.default_backend()
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  with jax.set_mesh(mesh):
    assert attention.current_platform() == mesh.devices.flat[0].platform


def test_cudnn_rejects_float32_with_a_clear_error():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="bfloat16/float16 only.*config.model.dtype"):
    attention.dot_product_attention(q, k, v, backend="cudnn")


@pytest.mark.skipif(
    jax.default_backend() != "gpu",
    reason="cuDNN flash attention needs an NVIDIA GPU, and none is present on this machine",
)
def test_cudnn_matches_reference_on_gpu():
  """bfloat16 inputs: the bound is bf16 rounding of q, k, v and of the output (~2^-8 relative). Key padding as a
  general mask (packed valid-first) and as suffix lengths; self- and cross-attention; 'auto' picks cudnn."""
  assert attention.resolve_backend("auto", jnp.bfloat16) == "cudnn"
  for kind in ("none", "mask", "lengths"):
    _check_against_reference("cudnn", 256, 256, kind, tol=3e-2, dtype=jnp.bfloat16, d=64)
  _check_against_reference("cudnn", 256, 64, "mask", tol=3e-2, dtype=jnp.bfloat16, d=64)


# ----------------------------------------------------------------------------- context parallelism


def _mesh(shape):
  return jax.make_mesh(shape, ("data", "fsdp", "context", "tensor"), axis_types=(AxisType.Auto,) * 4)


@pytest.mark.parametrize("backend", ["xla", "blocked", "splash"])
@pytest.mark.parametrize("shape,lq", [((2, 1, 4, 1), 80), ((1, 2, 2, 2), 78)])
def test_ulysses_context_parallel_matches_reference(backend, shape, lq):
  """Tokens split over the context axis; 78 tokens do not divide 4 devices (padded, masked, dropped)."""
  mesh = _mesh(shape)
  q, k, v = _qkv(lq, lq)
  mask = jnp.asarray(np.arange(lq)[None] < np.asarray([[lq - 9], [lq]]))
  _, lengths = _padding(lq, "lengths")
  ours = lambda q, k, v: attention.dot_product_attention(q, k, v, mask, lengths, backend=backend)
  ref = lambda q, k, v: attention.reference_attention(q, k, v, mask, lengths)
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    hlo = jax.jit(ours).lower(q, k, v).as_text()
    out = jax.jit(ours)(q, k, v)
    grads = jax.jit(jax.grad(_loss(ours), argnums=(0, 1, 2)))(q, k, v)
  assert hlo.count("all_to_all") == 4  # q, k, v to head shards; the output back to token shards
  assert _max_err(out, ref(q, k, v)) <= TOL
  for a, r in zip(grads, jax.grad(_loss(ref), argnums=(0, 1, 2))(q, k, v)):
    assert _max_err(a, r) <= TOL * max(1.0, float(jnp.max(jnp.abs(r))))


def test_cross_attention_under_context_parallelism_gathers_keys():
  mesh = _mesh((2, 1, 4, 1))
  q, k, v = _qkv(L, LT)
  mask, _ = _padding(LT, "mask")
  ours = lambda q, k, v: attention.dot_product_attention(q, k, v, mask, backend="xla", kv_follows_q=False)
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    hlo = jax.jit(ours).lower(q, k, v).as_text()
    out = jax.jit(ours)(q, k, v)
  assert "all_to_all" not in hlo
  assert _max_err(out, attention.reference_attention(q, k, v, mask)) <= TOL


def test_batch_that_the_batch_axes_do_not_divide_runs_replicated():
  """Sampling one or two stories on a data-parallel mesh: B = 2 over data = 4 runs with the batch replicated."""
  mesh = _mesh((4, 1, 2, 1))
  q, k, v = _qkv()
  _, lengths = _padding(L, "lengths")
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    out = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, None, lengths, backend="splash"))(q, k, v)
  assert _max_err(out, attention.reference_attention(q, k, v, None, lengths)) <= TOL


def test_context_parallelism_needs_divisible_heads():
  mesh = _mesh((1, 1, 4, 2))  # 4 heads over tensor=2 leaves 2 per device, not divisible by context=4
  q, k, v = _qkv()
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    with pytest.raises(ValueError, match=r"4 attention heads, 2 per device.*context.*size 4.*num_heads"):
      jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, backend="xla"))(q, k, v)


# ----------------------------------------------------------------------------- in the DiT


def test_dit_splash_equals_xla_with_padded_context():
  """The whole DiT (self-, text and image cross-attention) with splash equals xla; a context mask with holes is
  packed valid-first and gives the same output as the same tokens packed by hand."""
  kw = dict(in_channels=4, out_channels=4, text_dim=8, image_dim=6, dim=32, ffn_dim=64, num_heads=2, num_layers=1)
  xla_dit = wan_dit.WanTransformer3D(**kw, attention_impl="xla")
  splash_dit = wan_dit.WanTransformer3D(**kw, attention_impl="splash")
  rng = np.random.default_rng(3)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  x, t, text, image = f(B, 2, 4, 4, 4), jnp.asarray([10.0, 700.0]), f(B, 5, 8), f(B, 3, 6)
  ctx, pos = f(B, 6, 32), f(B, 6, 3)
  mask = jnp.asarray([[True, False, True, True, False, False], [False, True, False, False, False, True]])
  shapes = jax.eval_shape(lambda: xla_dit.init(jax.random.key(0), x, t, text, image)["params"])
  params = jax.tree.map(lambda p: jnp.asarray(0.1 * rng.standard_normal(p.shape), p.dtype), nn.unbox(shapes))
  run_xla, run_splash = (
      jax.jit(
          lambda c, p, mk, m=m: m.apply(
              {"params": params}, x, t, text, image, context=c, context_pos=p, context_mask=mk
          )
      )
      for m in (xla_dit, splash_dit)
  )
  out = run_xla(ctx, pos, mask)
  assert _max_err(run_splash(ctx, pos, mask), out) <= 1e-4 * float(jnp.max(jnp.abs(out)))
  order = np.argsort(~np.asarray(mask), axis=1, kind="stable")
  by_hand = run_xla(
      jnp.take_along_axis(ctx, order[..., None], 1),
      jnp.take_along_axis(pos, order[..., None], 1),
      jnp.take_along_axis(mask, order, 1),
  )
  assert _max_err(by_hand, out) <= 1e-6 * float(jnp.max(jnp.abs(out)))
  assert _max_err(run_xla(ctx, pos, jnp.ones_like(mask)), out) > 1e-3  # the padding is applied
