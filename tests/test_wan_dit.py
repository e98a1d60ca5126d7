"""Tests for the Wan2.1 DiT (onestory_jax/models/wan/dit.py) and its 3D RoPE (wan/rope.py)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import onestory
from onestory_jax.models.wan import dit as wan_dit
from onestory_jax.models.wan import rope

C_IN, C_OUT, TEXT_DIM, IMAGE_DIM = 4, 3, 8, 6
DIM, FFN, HEADS, LAYERS, FREQ = 32, 64, 2, 2, 16
B, LT, LI = 2, 5, 3


def make_model(**kw):
  args = dict(
      in_channels=C_IN,
      out_channels=C_OUT,
      text_dim=TEXT_DIM,
      image_dim=IMAGE_DIM,
      dim=DIM,
      ffn_dim=FFN,
      num_heads=HEADS,
      num_layers=LAYERS,
      freq_dim=FREQ,
  )
  args.update(kw)
  return wan_dit.WanTransformer3D(**args)


def inputs(shape=(2, 4, 6), seed=0):
  rng = np.random.default_rng(seed)
  f, h, w = shape
  x = jnp.asarray(rng.standard_normal((B, f, h, w, C_IN)), jnp.float32)
  t = jnp.array([10.0, 700.0])
  text = jnp.asarray(rng.standard_normal((B, LT, TEXT_DIM)), jnp.float32)
  image = jnp.asarray(rng.standard_normal((B, LI, IMAGE_DIM)), jnp.float32)
  return x, t, text, image


def make_context(nc=4, seed=1):
  rng = np.random.default_rng(seed)
  ctx = jnp.asarray(rng.standard_normal((B, nc, DIM)), jnp.float32)
  pos = jnp.asarray(rng.uniform(-3.0, 3.0, (B, nc, 3)), jnp.float32)
  return ctx, pos


def perturb(params, seed=123, scale=0.2):
  """Adds noise to every parameter so no path is silenced by a zero / identity init."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda p: p + jnp.asarray(scale * rng.standard_normal(p.shape), p.dtype), params)


def key_paths(tree):
  return {"/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def model_and_params():
  model = make_model()
  x, t, text, image = inputs()
  ctx, pos = make_context()
  # The rbg PRNG compiles much faster than threefry on CPU.
  variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x, t, text, image, context=ctx, context_pos=pos)
  init_params = nn.meta.unbox(variables["params"])
  fwd = jax.jit(lambda p, *a, **kw: model.apply({"params": p}, *a, **kw))
  return model, perturb(init_params), fwd, init_params


@pytest.fixture(scope="module")
def grads_and_loss(model_and_params):
  """Loss, parameter grads and context grads of the unrolled, non-remat model."""
  model, params, _, _ = model_and_params
  return jax.jit(jax.value_and_grad(_loss_fn(model), argnums=(0, 1)))(params, make_context(3)[0])


def _loss_fn(model):
  x, t, text, image = inputs()
  pos = make_context(nc=3)[1]

  def loss(p, ctx):
    out = model.apply({"params": p}, x, t, text, image, context=ctx, context_pos=pos)
    return jnp.mean((out - 1.0) ** 2)

  return loss


# ----------------------------------------------------------------------------- structure


@pytest.mark.parametrize(
    "shape,patch", [((1, 2, 2), (1, 2, 2)), ((2, 4, 6), (1, 2, 2)), ((3, 6, 4), (1, 2, 2)), ((4, 4, 8), (2, 2, 2))]
)
def test_output_shape(shape, patch):
  model = make_model(patch_size=patch)
  x, t, text, image = inputs(shape)
  ctx, pos = make_context(nc=3)
  out = jax.eval_shape(
      lambda: model.init_with_output(jax.random.key(0), x, t, text, image, context=ctx, context_pos=pos)[0]
  )
  assert out.shape == (B, *shape, C_OUT)


def test_real_forward_shape_and_zero_init_head(model_and_params):
  _, _, fwd, init_params = model_and_params
  x, t, text, image = inputs()
  out = fwd(init_params, x, t, text, image)
  assert out.shape == (B, 2, 4, 6, C_OUT)
  # proj_out starts at zero (Wan's head init), so the untrained model predicts zeros.
  np.testing.assert_array_equal(np.asarray(out), 0.0)


def expected_param_paths(num_layers, image=True):
  block = [
      "scale_shift_table",
      "norm2/scale",
      "norm2/bias",
      "ffn/net_0/proj/kernel",
      "ffn/net_0/proj/bias",
      "ffn/net_2/kernel",
      "ffn/net_2/bias",
  ]
  for attn in ("attn1", "attn2"):
    for lin in ("to_q", "to_k", "to_v", "to_out_0"):
      block += [f"{attn}/{lin}/kernel", f"{attn}/{lin}/bias"]
    block += [f"{attn}/norm_q/scale", f"{attn}/norm_k/scale"]
  if image:
    block += [
        "attn2/add_k_proj/kernel",
        "attn2/add_k_proj/bias",
        "attn2/add_v_proj/kernel",
        "attn2/add_v_proj/bias",
        "attn2/norm_added_k/scale",
    ]
  top = ["patch_embedding/kernel", "patch_embedding/bias", "proj_out/kernel", "proj_out/bias", "scale_shift_table"]
  for mlp in ("time_embedder", "text_embedder"):
    for lin in ("linear_1", "linear_2"):
      top += [f"condition_embedder/{mlp}/{lin}/kernel", f"condition_embedder/{mlp}/{lin}/bias"]
  top += ["condition_embedder/time_proj/kernel", "condition_embedder/time_proj/bias"]
  if image:
    ie = "condition_embedder/image_embedder"
    top += [
        f"{ie}/norm1/scale",
        f"{ie}/norm1/bias",
        f"{ie}/norm2/scale",
        f"{ie}/norm2/bias",
        f"{ie}/ff/net_0/proj/kernel",
        f"{ie}/ff/net_0/proj/bias",
        f"{ie}/ff/net_2/kernel",
        f"{ie}/ff/net_2/bias",
    ]
  return set(top) | {f"blocks_{i}/{p}" for i in range(num_layers) for p in block}


def param_count(d, ffn, layers, c_in, c_out, patch, text_dim, image_dim, freq):
  p = math.prod(patch)
  lin = lambda i, o: i * o + o
  n = lin(p * c_in, d) + lin(freq, d) + lin(d, d) + lin(d, 6 * d) + lin(text_dim, d) + lin(d, d)
  n += 2 * image_dim + lin(image_dim, image_dim) + lin(image_dim, d) + 2 * d
  block = 6 * d + 4 * lin(d, d) + 2 * d  # table, attn1, its q/k norms
  block += 2 * d  # norm2
  block += 4 * lin(d, d) + 2 * d + 2 * lin(d, d) + d  # attn2 incl. image k/v and norm_added_k
  block += lin(d, ffn) + lin(ffn, d)
  return n + layers * block + 2 * d + lin(d, c_out * p)


def test_param_tree_and_count():
  model = make_model(num_layers=3)
  x, t, text, image = inputs((1, 2, 2))
  shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), x, t, text, image)["params"]))
  assert key_paths(shapes) == expected_param_paths(3)
  n = sum(a.size for a in jax.tree_util.tree_leaves(shapes))
  assert n == param_count(DIM, FFN, 3, C_IN, C_OUT, (1, 2, 2), TEXT_DIM, IMAGE_DIM, FREQ)
  assert shapes["patch_embedding"]["kernel"].shape == (1, 2, 2, C_IN, DIM)
  assert shapes["blocks_0"]["scale_shift_table"].shape == (1, 6, DIM)
  assert shapes["scale_shift_table"].shape == (1, 2, DIM)
  assert shapes["condition_embedder"]["time_proj"]["kernel"].shape == (DIM, 6 * DIM)
  # T2V model: no image branch anywhere.
  t2v = make_model(image_dim=None, num_layers=1)
  shapes = jax.eval_shape(lambda: nn.meta.unbox(t2v.init(jax.random.key(0), x, t, text)["params"]))
  assert key_paths(shapes) == expected_param_paths(1, image=False)


def test_scanned_params_have_layer_axis_and_logical_names():
  model = make_model(scan_layers=True)
  x, t, text, image = inputs((1, 2, 2))
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, text, image)["params"])
  specs = nn.get_partition_spec(boxed)
  assert specs["blocks"]["attn1"]["to_q"]["kernel"] == jax.sharding.PartitionSpec("layers", "embed", "heads")
  assert specs["blocks"]["ffn"]["net_2"]["kernel"] == jax.sharding.PartitionSpec("layers", "mlp", "embed")
  assert specs["patch_embedding"]["kernel"] == jax.sharding.PartitionSpec(None, None, None, "conv_in", "embed")
  assert specs["proj_out"]["kernel"] == jax.sharding.PartitionSpec("embed", "conv_out")
  unboxed = nn.meta.unbox(boxed)
  assert unboxed["blocks"]["scale_shift_table"].shape == (LAYERS, 1, 6, DIM)
  # Every parameter is annotated.
  for path, leaf in jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda a: isinstance(a, nn.Partitioned))[0]:
    assert isinstance(leaf, nn.Partitioned), path


# ----------------------------------------------------------------------------- RoPE


def test_rope_split_sizes():
  assert rope.rope_split(128) == (44, 42, 42)
  assert rope.rope_split(16) == (8, 4, 4)
  for bad in (7, 4, 0):
    with pytest.raises(ValueError, match="head_dim"):
      rope.rope_split(bad)


def test_rope_zero_positions_is_identity():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 3, 16)), jnp.float32)
  cos, sin = rope.rope_angles(jnp.zeros((2, 5, 3)), 16)
  np.testing.assert_array_equal(np.asarray(rope.apply_rope(x, cos, sin)), np.asarray(x))


def test_rope_matches_complex_reference():
  dh, theta = 24, 10000.0
  pos = np.array([[[0, 0, 0], [1, 2, 3], [-1.5, 0.25, 7]]], np.float32)
  x = np.random.default_rng(1).standard_normal((1, 3, 2, dh)).astype(np.float32)
  ct, ch, cw = dh - 4 * (dh // 6), 2 * (dh // 6), 2 * (dh // 6)
  angles = np.concatenate(
      [pos[..., a : a + 1] / theta ** (np.arange(0, c, 2) / c) for a, c in enumerate((ct, ch, cw))], axis=-1
  )  # [1, 3, dh/2]
  z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * angles)[:, :, None, :]
  ref = np.stack([z.real, z.imag], axis=-1).reshape(x.shape)
  cos, sin = rope.rope_angles(jnp.asarray(pos), dh, theta)
  np.testing.assert_allclose(np.asarray(rope.apply_rope(jnp.asarray(x), cos, sin)), ref, rtol=1e-5, atol=1e-5)


def test_rope_relative_position_property():
  dh = 16
  rng = np.random.default_rng(2)
  q = jnp.asarray(rng.standard_normal((1, 1, 1, dh)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 1, 1, dh)), jnp.float32)

  def score(p1, p2):
    c1, s1 = rope.rope_angles(jnp.asarray(p1, jnp.float32)[None, None], dh)
    c2, s2 = rope.rope_angles(jnp.asarray(p2, jnp.float32)[None, None], dh)
    return float(jnp.sum(rope.apply_rope(q, c1, s1) * rope.apply_rope(k, c2, s2)))

  p1, p2 = np.array([1.0, 2.0, 3.0]), np.array([-2.0, 0.5, 4.0])
  base = score(p1, p2)
  for shift in ([3.0, -1.0, 2.5], [-7.0, 4.0, 0.0], [0.5, 0.5, 0.5]):
    assert score(p1 + shift, p2 + shift) == pytest.approx(base, abs=1e-4)
  # ...and it does depend on the offset along every axis.
  for axis in range(3):
    moved = p1.copy()
    moved[axis] += 1.0
    assert abs(score(moved, p2) - base) > 1e-3


def test_grid_positions_raster_order():
  g = np.asarray(rope.grid_positions(2, 3, 4))
  assert g.shape == (24, 3)
  np.testing.assert_array_equal(g[0], [0, 0, 0])
  np.testing.assert_array_equal(g[1], [0, 0, 1])
  np.testing.assert_array_equal(g[4], [0, 1, 0])
  np.testing.assert_array_equal(g[12], [1, 0, 0])
  np.testing.assert_array_equal(g[-1], [1, 2, 3])
  with pytest.raises(ValueError, match="h must be a positive integer"):
    rope.grid_positions(1, 0, 2)


# ----------------------------------------------------------------------------- embeddings


def test_patch_embedding_equals_conv3d():
  patch = (2, 2, 2)
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((2, 4, 6, 4, 5)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((*patch, 5, 7)), jnp.float32)
  bias = jnp.asarray(rng.standard_normal((7,)), jnp.float32)
  module = wan_dit.PatchEmbed(7, patch)
  out = module.apply({"params": {"kernel": kernel, "bias": bias}}, x)
  ref = (
      jax.lax.conv_general_dilated(
          x,
          kernel,
          window_strides=patch,
          padding="VALID",
          dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
          precision=jax.lax.Precision.HIGHEST,
      )
      + bias
  )
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref.reshape(2, -1, 7)), rtol=1e-5, atol=1e-5)


def test_patchify_roundtrip_and_errors():
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 4, 6, 8, 3)), jnp.float32)
  tokens = wan_dit.patchify(x, (2, 3, 2))
  assert tokens.shape == (2, 2 * 2 * 4, 2 * 3 * 2 * 3)
  np.testing.assert_array_equal(np.asarray(wan_dit.unpatchify(tokens, (2, 2, 4), (2, 3, 2))), np.asarray(x))
  # Token 1 is the patch at (f=0, h=0, w=1); its features are ordered (pt, ph, pw, c).
  np.testing.assert_array_equal(np.asarray(tokens[0, 1]).reshape(2, 3, 2, 3), np.asarray(x[0, 0:2, 0:3, 2:4]))
  with pytest.raises(ValueError, match="divisible"):
    wan_dit.patchify(x, (3, 3, 2))
  with pytest.raises(ValueError, match="unpatchify"):
    wan_dit.unpatchify(tokens, (2, 2, 3), (2, 3, 2))


def test_timestep_embedding_matches_numpy():
  t = np.array([0.0, 1.0, 37.5, 999.0], np.float32)
  dim = 16
  half = dim // 2
  freqs = np.exp(-np.log(10000.0) * np.arange(half) / half)
  args = t[:, None].astype(np.float64) * freqs[None]
  ref = np.concatenate([np.cos(args), np.sin(args)], axis=1)
  np.testing.assert_allclose(np.asarray(wan_dit.timestep_embedding(jnp.asarray(t), dim)), ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- OneStory context


def full_kw(ctx, pos, mask=None, ts=None):
  """Context kwargs with every optional argument explicit (one compiled signature)."""
  b, nc = ctx.shape[:2]
  return dict(
      context=ctx,
      context_pos=pos,
      context_mask=jnp.ones((b, nc), bool) if mask is None else mask,
      context_timestep=jnp.zeros((b,)) if ts is None else ts,
  )


def test_masked_context_is_invisible(model_and_params):
  _, params, fwd, _ = model_and_params
  x, t, text, image = inputs()
  ctx, pos = make_context(nc=4)
  plain = fwd(params, x, t, text, image)
  all_masked = fwd(params, x, t, text, image, **full_kw(ctx, pos, jnp.zeros((B, 4), bool), jnp.array([3.0, 900.0])))
  np.testing.assert_allclose(np.asarray(all_masked), np.asarray(plain), rtol=1e-5, atol=1e-5)
  # With some tokens padded, what the padded slots hold (tokens, positions) does not matter.
  mask = jnp.array([[True, False, True, False], [False, False, True, True]])
  padded = fwd(params, x, t, text, image, **full_kw(ctx, pos, mask))
  junk_ctx = jnp.where(mask[..., None], ctx, 50.0 * jnp.ones_like(ctx))
  junk_pos = jnp.where(mask[..., None], pos, -123.0)
  junk = fwd(params, x, t, text, image, **full_kw(junk_ctx, junk_pos, mask))
  np.testing.assert_allclose(np.asarray(junk), np.asarray(padded), rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(padded - plain))) > 1e-3  # the valid ones do count


def test_valid_context_changes_output(model_and_params):
  _, params, fwd, _ = model_and_params
  x, t, text, image = inputs()
  ctx, pos = make_context(nc=4)
  plain = fwd(params, x, t, text, image)
  with_ctx = fwd(params, x, t, text, image, **full_kw(ctx, pos))
  assert float(jnp.max(jnp.abs(with_ctx - plain))) > 1e-3
  # Context positions matter (RoPE), and so does the context timestep (own modulation).
  moved = fwd(params, x, t, text, image, **full_kw(ctx, pos - 5.0))
  assert float(jnp.max(jnp.abs(moved - with_ctx))) > 1e-4
  noisy = fwd(params, x, t, text, image, **full_kw(ctx, pos, ts=jnp.array([500.0, 500.0])))
  assert float(jnp.max(jnp.abs(noisy - with_ctx))) > 1e-4


def test_context_permutation_invariance(model_and_params):
  _, params, fwd, _ = model_and_params
  x, t, text, image = inputs()
  ctx, pos = make_context(nc=4)
  mask = jnp.array([[True, True, False, True], [True, False, True, True]])
  ts = jnp.array([0.0, 250.0])
  out = fwd(params, x, t, text, image, **full_kw(ctx, pos, mask, ts))
  perm = jnp.array([2, 0, 3, 1])
  out_p = fwd(params, x, t, text, image, **full_kw(ctx[:, perm], pos[:, perm], mask[:, perm], ts))
  np.testing.assert_allclose(np.asarray(out_p), np.asarray(out), rtol=1e-5, atol=1e-5)


def test_image_cross_attention_path(model_and_params):
  _, params, fwd, _ = model_and_params
  x, t, text, image = inputs()
  a = fwd(params, x, t, text, image)
  b = fwd(params, x, t, text, jnp.zeros_like(image))
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3
  # Removing the image branch's output projection contribution: zero add_v_proj makes the image
  # attention output exactly zero, so the image no longer matters.
  p = jax.tree_util.tree_map(lambda v: v, params)
  for i in range(LAYERS):
    p[f"blocks_{i}"]["attn2"]["add_v_proj"] = jax.tree_util.tree_map(
        jnp.zeros_like, p[f"blocks_{i}"]["attn2"]["add_v_proj"]
    )
  np.testing.assert_allclose(
      np.asarray(fwd(p, x, t, text, image)), np.asarray(fwd(p, x, t, text, jnp.zeros_like(image))), rtol=1e-6, atol=1e-6
  )


def test_text_zero_padding_semantics(model_and_params):
  _, params, fwd, _ = model_and_params
  x, t, text, image = inputs()
  padded = jnp.concatenate([text, jnp.zeros((B, 3, TEXT_DIM))], axis=1)
  short = fwd(params, x, t, text, image)
  # Wan semantics: zero-padded text tokens are attended like any other token (an all-True
  # mask is the same as no mask), so padding changes the output...
  unmasked = fwd(params, x, t, padded, image, text_mask=jnp.ones((B, LT + 3), bool))
  assert float(jnp.max(jnp.abs(unmasked - short))) > 1e-4
  # ...unless an explicit text mask marks it.
  mask = jnp.concatenate([jnp.ones((B, LT), bool), jnp.zeros((B, 3), bool)], axis=1)
  np.testing.assert_allclose(
      np.asarray(fwd(params, x, t, padded, image, text_mask=mask)), np.asarray(short), rtol=1e-5, atol=1e-5
  )


def test_timestep_changes_output(model_and_params):
  _, params, fwd, _ = model_and_params
  x, _, text, image = inputs()
  a = fwd(params, x, jnp.array([10.0, 10.0]), text, image)
  b = fwd(params, x, jnp.array([10.0, 600.0]), text, image)
  np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[0]), rtol=1e-6, atol=1e-6)
  assert float(jnp.max(jnp.abs(a[1] - b[1]))) > 1e-4


# ----------------------------------------------------------------------------- scan / remat / jit


def restack(params, num_layers):
  params = dict(params)
  blocks = [params.pop(f"blocks_{i}") for i in range(num_layers)]
  params["blocks"] = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *blocks)
  return params


def test_scan_equals_unrolled(model_and_params):
  model, params, fwd, _ = model_and_params
  scanned = make_model(scan_layers=True)
  sparams = restack(params, LAYERS)
  x, t, text, image = inputs()
  ctx, pos = make_context(nc=4)
  mask = jnp.array([[True, False, True, True], [True, True, True, False]])
  kw = full_kw(ctx, pos, mask, jnp.array([0.0, 30.0]))
  out_s = jax.jit(lambda p: scanned.apply({"params": p}, x, t, text, image, **kw))(sparams)
  np.testing.assert_allclose(np.asarray(out_s), np.asarray(fwd(params, x, t, text, image, **kw)), rtol=1e-5, atol=1e-5)
  # The scanned model's own init has the same (restacked) structure.
  shapes = jax.eval_shape(lambda: nn.meta.unbox(scanned.init(jax.random.key(0), x, t, text, image, **kw)["params"]))
  assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(sparams)
  for a, b in zip(jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(sparams)):
    assert a.shape == b.shape


def test_remat_gives_same_grads(model_and_params, grads_and_loss):
  _, params, _, _ = model_and_params
  _, (ref, _) = grads_and_loss
  ctx = make_context(3)[0]
  # Scanned + 'dots' policy: numerically checked against the plain unrolled gradients.
  g = dict(jax.jit(jax.grad(_loss_fn(make_model(remat="dots", scan_layers=True))))(restack(params, LAYERS), ctx))
  stacked = g.pop("blocks")
  for i in range(LAYERS):
    g[f"blocks_{i}"] = jax.tree_util.tree_map(lambda a, i=i: a[i], stacked)
  assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(ref)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ref)[0], jax.tree_util.tree_leaves(g)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6, err_msg=str(path))
  # The other remat paths trace to gradients of the right structure.
  for kw, p in (
      (dict(remat="full"), params),
      (dict(remat="dots"), params),
      (dict(remat="full", scan_layers=True), restack(params, LAYERS)),
  ):
    shapes = jax.eval_shape(jax.grad(_loss_fn(make_model(**kw))), p, ctx)
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(p), kw


def test_jit_grad_reaches_every_parameter(grads_and_loss):
  loss, (g, g_ctx) = grads_and_loss
  assert np.isfinite(float(loss))
  for path, leaf in jax.tree_util.tree_flatten_with_path(g)[0]:
    assert np.all(np.isfinite(np.asarray(leaf))), path
    assert float(jnp.max(jnp.abs(leaf))) > 0.0, path
  assert float(jnp.max(jnp.abs(g_ctx))) > 0.0  # gradients flow back into the context tokens


def test_sharded_forward_with_default_context_args(model_and_params):
  """Runs under a mesh with the config's logical rules. Leaving context_mask and
  context_timestep out means: every context token valid, context timestep 0 (clean)."""
  model, params, fwd, _ = model_and_params
  cfg = onestory.get_config("tiny")
  mesh = jax.make_mesh((2, 2, 1, 2), cfg.mesh.axes, axis_types=(jax.sharding.AxisType.Auto,) * 4)
  x, t, text, image = inputs()
  ctx, pos = make_context(nc=4)
  with jax.set_mesh(mesh), nn.logical_axis_rules(cfg.logical_axis_rules):
    out = jax.jit(lambda p: model.apply({"params": p}, x, t, text, image, context=ctx, context_pos=pos))(params)
  ref = fwd(params, x, t, text, image, **full_kw(ctx, pos))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- config / errors


def test_from_config_and_make_dit():
  cfg = onestory.get_config("tiny")
  model = wan_dit.make_dit(cfg, C_IN, C_OUT, TEXT_DIM, IMAGE_DIM)
  assert (model.dim, model.num_heads, model.num_layers, model.ffn_dim) == (32, 2, 2, 64)
  assert model.patch_size == (1, 2, 2) and model.dtype == jnp.float32
  bf16 = wan_dit.WanTransformer3D.from_config(
      cfg.model, C_IN, C_OUT, TEXT_DIM, IMAGE_DIM, freq_dim=FREQ, dtype=jnp.bfloat16
  )
  x, t, text, image = inputs((1, 2, 2))
  out = jax.eval_shape(lambda: bf16.init_with_output(jax.random.key(0), x, t, text, image)[0])
  assert out.dtype == jnp.bfloat16
  bad = ml_collections.ConfigDict(cfg.model.to_dict())
  bad.dtype = "float33"
  with pytest.raises(ValueError, match="dtype"):
    wan_dit.WanTransformer3D.from_config(bad, C_IN, C_OUT, TEXT_DIM)
  del bad.remat
  with pytest.raises(ValueError, match="config.model.remat"):
    wan_dit.WanTransformer3D.from_config(bad, C_IN, C_OUT, TEXT_DIM)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(x=jnp.zeros((B, 2, 4, 6, C_IN + 1))), "x: expected"),
        (dict(x=jnp.zeros((B, 2, 5, 6, C_IN))), "divisible by patch_size"),
        (dict(t=jnp.zeros((B + 1,))), "timestep"),
        (dict(text=jnp.zeros((B, LT, TEXT_DIM + 1))), "text: expected"),
        (dict(image=None), "image: required"),
        (dict(context=jnp.zeros((B, 3, DIM))), "context_pos"),
        (dict(context=jnp.zeros((B, 3, DIM + 1))), "context: expected"),
        (dict(context_pos=jnp.zeros((B, 3, 3))), "without context"),
        (
            dict(context=jnp.zeros((B, 3, DIM)), context_pos=jnp.zeros((B, 3, 3)), context_mask=jnp.ones((B, 2), bool)),
            "context_mask",
        ),
        (dict(text_mask=jnp.ones((B, LT + 1), bool)), "text_mask"),
    ],
)
def test_bad_inputs_raise(change, match):
  model = make_model()
  x, t, text, image = inputs()
  args = dict(x=x, t=t, text=text, image=image)
  kw = {}
  for k, v in change.items():
    (args if k in args else kw)[k] = v
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda: model.init(jax.random.key(0), args["x"], args["t"], args["text"], args["image"], **kw))


def test_bad_attributes_raise():
  x, t, text, image = inputs((1, 2, 2))
  for kw, match in (
      (dict(num_heads=3), "divisible by model.num_heads"),
      (dict(remat="some"), "model.remat"),
      (dict(dim=8, num_heads=2), "head_dim"),
  ):
    with pytest.raises(ValueError, match=match):
      jax.eval_shape(lambda kw=kw: make_model(**kw).init(jax.random.key(0), x, t, text, image))
  t2v = make_model(image_dim=None)
  with pytest.raises(ValueError, match="image_dim=None"):
    jax.eval_shape(lambda: t2v.init(jax.random.key(0), x, t, text, image))


def test_stored_block_boundary_is_an_exact_identity_that_xla_keeps():
  """The residual stream between unrolled blocks (``_stored``): the identity, in value and gradient, for every float
  (NaN, infinities, -0.0), and a conditional in the compiled CPU program both ways: if JAX or XLA ever drops it, the
  DiT's backward on CPU gets 1.7x slower (README, "What the DiT's backward lost")."""
  x = jnp.asarray([[np.nan, -0.0, np.inf], [-np.inf, 1.5, -2.25]], jnp.float32)
  for v in (x, x[::-1], jnp.asarray(x, jnp.bfloat16)):
    np.testing.assert_array_equal(np.asarray(wan_dit._stored(v), np.float32), np.asarray(v, np.float32))
  y = jnp.arange(6.0).reshape(2, 3) - 2.0
  f = lambda z: jnp.sum(wan_dit._stored(z * 3.0) ** 2)
  np.testing.assert_array_equal(jax.grad(f)(y), 18.0 * y)
  hlo = jax.jit(jax.grad(f)).lower(y).compile().as_text()
  assert hlo.count("conditional(") == 2, hlo  # the value in the forward pass, the cotangent in the backward pass


def test_unrolled_blocks_store_the_residual_stream_on_cpu(model_and_params):
  model, params, _, _ = model_and_params
  x, t, text, image = inputs()
  ctx, pos = make_context()
  lowered = jax.jit(lambda p: model.apply({"params": p}, x, t, text, image, context=ctx, context_pos=pos)).lower(params)
  assert lowered.as_text().count("stablehlo.case") == model.num_layers  # one stored boundary after each block
