"""Tests for the T5-style text encoder (models/wan/umt5.py)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import onestory
from onestory_jax.models.wan import umt5 as te

VOCAB, D, LAYERS, HEADS, FF, BUCKETS, MAXDIST = 40, 16, 2, 4, 32, 8, 20


def _model(**kw):
  args = dict(
      vocab_size=VOCAB,
      d_model=D,
      num_layers=LAYERS,
      num_heads=HEADS,
      d_ff=FF,
      rel_buckets=BUCKETS,
      rel_max_distance=MAXDIST,
  )
  args.update(kw)
  return te.T5Encoder(**args)


def _init(model, length=6):
  return nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.ones((1, length), jnp.int32)))


_INIT = {}


def _cached_init(model, seed):
  """Jitted init, compiled once per model (compiling the RNG-heavy init is slow on CPU)."""
  if id(model) not in _INIT:
    _INIT[id(model)] = jax.jit(lambda key: nn.unbox(model.init(key, jnp.ones((1, 6), jnp.int32))))
  return _INIT[id(model)](jax.random.key(seed))


_APPLY = {}


def _apply(model, params, tokens, pad_id=0):
  """Jitted apply, one compiled wrapper per model (eager dispatch is slow on a busy CPU)."""
  if id(model) not in _APPLY:
    _APPLY[id(model)] = jax.jit(model.apply, static_argnames="pad_id")
  return _APPLY[id(model)](params, tokens, pad_id=pad_id)


@pytest.fixture(scope="module")
def model_and_params():
  model = _model()
  return model, _cached_init(model, 0)


TOKENS = jnp.array([[5, 6, 7, 8, 0, 0], [9, 3, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], jnp.int32)


# ------------------------------------------------------------------ relative position buckets
def _bucket_reference(rel: int, num_buckets: int, max_distance: int) -> int:
  """Scalar re-derivation of T5's bidirectional bucketing."""
  half = num_buckets // 2
  offset = half if rel > 0 else 0
  n = abs(rel)
  exact = half // 2
  if n < exact:
    return offset + n
  b = exact + int(math.log(n / exact) / math.log(max_distance / exact) * (half - exact))
  return offset + min(b, half - 1)


def test_bucket_hand_computed_t5_defaults():
  # 32 buckets, max distance 128: 16 per direction, distances 0..7 exact, then
  # 8 + floor(ln(n/8) / ln(16) * 8) up to bucket 15. Values computed by hand.
  rel = np.array([0, 1, 7, 8, 10, 20, 40, 100, 127, 500, -1, -7, -10, -20, -40, -100, -500])
  expected = np.array([0, 17, 23, 24, 24, 26, 28, 31, 31, 31, 1, 7, 8, 10, 12, 15, 15])
  got = np.asarray(te.relative_position_bucket(jnp.asarray(rel), 32, 128))
  np.testing.assert_array_equal(got, expected)


def test_bucket_matches_scalar_reference_small():
  rel = np.arange(-60, 61)
  got = np.asarray(te.relative_position_bucket(jnp.asarray(rel), BUCKETS, MAXDIST))
  want = np.array([_bucket_reference(int(r), BUCKETS, MAXDIST) for r in rel])
  np.testing.assert_array_equal(got, want)
  assert got.min() == 0 and got.max() == BUCKETS - 1
  # Keys after the query use the upper half; at or before it, the lower half.
  assert (got[rel > 0] >= BUCKETS // 2).all() and (got[rel <= 0] < BUCKETS // 2).all()


# ------------------------------------------------------------------ numpy reference encoder
def _rms(x, scale):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6) * scale


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _reference(params, tokens, pad_id=0):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  tokens = np.asarray(tokens)
  mask = tokens != pad_id
  x = p["token_embedding"][tokens]
  length = tokens.shape[1]
  rel = np.arange(length)[None, :] - np.arange(length)[:, None]
  buckets = np.vectorize(lambda r: _bucket_reference(int(r), BUCKETS, MAXDIST))(rel)
  for i in range(LAYERS):
    lp = p[f"layers_{i}"]
    h = _rms(x, lp["attn_norm"]["scale"])
    q = np.einsum("bld,dhk->blhk", h, lp["attn"]["q"]["kernel"])
    k = np.einsum("bld,dhk->blhk", h, lp["attn"]["k"]["kernel"])
    v = np.einsum("bld,dhk->blhk", h, lp["attn"]["v"]["kernel"])
    logits = np.einsum("bqhk,bphk->bhqp", q, k)  # unscaled
    logits = logits + lp["attn"]["relative_attention_bias"][buckets].transpose(2, 0, 1)[None]
    logits = np.where(mask[:, None, None, :], logits, -1e30)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    o = np.einsum("bhqp,bphk->bqhk", w, v)
    x = x + np.einsum("bqhk,hkd->bqd", o, lp["attn"]["o"]["kernel"])
    h = _rms(x, lp["ffn_norm"]["scale"])
    f = lp["ffn"]
    x = x + (_gelu_tanh(h @ f["wi_0"]["kernel"]) * (h @ f["wi_1"]["kernel"])) @ f["wo"]["kernel"]
  return np.where(mask[..., None], _rms(x, p["final_norm"]["scale"]), 0.0)


def test_matches_numpy_reference(model_and_params):
  model, params = model_and_params
  got = np.asarray(_apply(model, params, TOKENS))
  want = _reference(params, TOKENS)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


# ------------------------------------------------------------------ behaviour
def test_shapes_padding_zero_and_finite(model_and_params):
  model, params = model_and_params
  out = _apply(model, params, TOKENS)
  assert out.shape == (3, 6, D) and out.dtype == jnp.float32
  assert bool(jnp.isfinite(out).all())
  pad = np.asarray(TOKENS) == 0
  assert (np.asarray(out)[pad] == 0).all()  # exactly zero, including the all-padding row
  assert (np.abs(np.asarray(out)[~pad]).sum(-1) > 0).all()


def test_real_outputs_ignore_padding_content_and_length(model_and_params):
  model, params = model_and_params
  out = np.asarray(_apply(model, params, TOKENS))
  # What the pad token's embedding holds does not leak into real positions.
  changed = jax.tree.map(lambda a: a, params)
  changed["params"]["token_embedding"] = params["params"]["token_embedding"].at[0].set(50.0)
  np.testing.assert_allclose(np.asarray(_apply(model, changed, TOKENS)), out, atol=1e-6)
  # Nor does the amount or place of padding: relative positions only, padded keys masked.
  short = _apply(model, params, TOKENS[:1, :4])
  np.testing.assert_allclose(np.asarray(short), out[:1, :4], atol=1e-5)
  shifted = _apply(model, params, jnp.array([[0, 0, 5, 6, 7, 8, 0]], jnp.int32))
  np.testing.assert_allclose(np.asarray(shifted)[:, 2:6], out[:1, :4], atol=1e-5)
  # A different pad id masks a different token.
  other = _apply(model, params, TOKENS[:1, :4].at[0, 3].set(1), pad_id=1)
  np.testing.assert_allclose(np.asarray(other)[:, :3], np.asarray(_apply(model, params, TOKENS[:1, :3])), atol=1e-5)
  assert (np.asarray(other)[:, 3] == 0).all()


def test_positions_matter(model_and_params):
  model, params = model_and_params
  a = np.asarray(_apply(model, params, jnp.array([[5, 6, 7]], jnp.int32)))
  b = np.asarray(_apply(model, params, jnp.array([[7, 6, 5]], jnp.int32)))
  # Without position information, reversing the tokens would reverse the outputs exactly.
  assert np.abs(a[0, ::-1] - b[0]).max() > 1e-3


def test_params_have_per_layer_bias_and_logical_names():
  model = _model()
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 4), jnp.int32))
  names = jax.tree.map(lambda x: x.names, boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert names["token_embedding"] == ("vocab", "embed")
  for i in range(LAYERS):
    layer = names[f"layers_{i}"]
    assert layer["attn"]["relative_attention_bias"] == (None, "heads")
    assert layer["attn"]["q"]["kernel"] == ("embed", "heads", "kv")
    assert layer["ffn"]["wi_0"]["kernel"] == ("embed", "mlp")
    assert layer["ffn"]["wo"]["kernel"] == ("mlp", "embed")
    assert nn.unbox(boxed)["params"][f"layers_{i}"]["attn"]["relative_attention_bias"].shape == (BUCKETS, HEADS)
  leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(x, nn.Partitioned) for x in leaves)
  flat = jax.tree_util.tree_flatten_with_path(nn.unbox(boxed))[0]
  assert not any("bias" == str(getattr(k[-1], "key", "")) for k, _ in flat)  # no dense biases


def test_determinism_jit_and_grad(model_and_params):
  model, p1 = model_and_params
  p2 = _cached_init(model, 0)
  jax.tree.map(np.testing.assert_array_equal, p1, p2)
  p3 = _cached_init(model, 1)
  assert not np.array_equal(p1["params"]["token_embedding"], p3["params"]["token_embedding"])
  first = _apply(model, p1, TOKENS)
  np.testing.assert_array_equal(np.asarray(_apply(model, p2, TOKENS)), np.asarray(first))

  def loss(params):
    return jnp.sum(jnp.square(_apply(model, params, TOKENS) - 0.5))

  grads = jax.jit(jax.grad(loss))(p1)
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    assert bool(jnp.isfinite(g).all()), path
    assert float(jnp.abs(g).max()) > 0, path
  # The pad token's embedding row gets no gradient.
  assert float(jnp.abs(grads["params"]["token_embedding"][0]).max()) == 0.0


def test_sharded_apply_matches_unsharded(model_and_params):
  model, params = model_and_params
  config = onestory.get_config("tiny")
  tokens = jnp.tile(TOKENS[:2], (4, 1))  # [8, 6]
  boxed = jax.eval_shape(model.init, jax.random.key(0), tokens)
  want = _apply(model, params, tokens)
  mesh = jax.make_mesh(
      (2, 2, 1, 2), ("data", "fsdp", "context", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 4
  )
  rules = tuple(config.logical_axis_rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    sharded = jax.device_put(params, shardings)
    got = jax.jit(model.apply)(sharded, tokens)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_factory_config_and_errors():
  config = onestory.get_config("tiny")
  model = te.make_text_encoder(config, vocab_size=77)
  assert isinstance(model, te.T5Encoder)
  assert (model.vocab_size, model.d_model, model.num_heads) == (77, 32, 2)
  assert te.text_dim(config) == config.text_encoder.d_model == 32
  with pytest.raises(ValueError, match=r"d_model = 16 must be divisible by num_heads = 3"):
    _init(_model(num_heads=3))
  with pytest.raises(ValueError, match=r"rel_buckets must be an even int >= 4, got 7"):
    _init(_model(rel_buckets=7))
  with pytest.raises(ValueError, match=r"tokens must be an int array \[B, L\]"):
    _model().init(jax.random.key(0), jnp.ones((1, 4), jnp.float32))
  config.text_encoder.name = "umt5_xl"
  with pytest.raises(ValueError, match=r"unknown text encoder 'umt5_xl'; available: t5"):
    te.make_text_encoder(config, 10)
  with pytest.raises(ValueError, match=r"unknown text encoder 'umt5_xl'"):
    te.text_dim(config)
