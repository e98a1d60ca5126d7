"""Numerical parity of the Wan DiT port with diffusers' ``WanTransformer3DModel``.

Each test builds a tiny random reference in-process (2 layers, 2 heads of width 16, FFN 64), saves it as safetensors
in the published layout (``transformer/config.json`` + ``diffusion_pytorch_model.safetensors``), converts it with
:func:`onestory_jax.convert.convert_component` (the code behind ``python -m onestory_jax.convert``), loads it with
:func:`onestory_jax.weights.load_converted` and compares the outputs on the same inputs.

Relative error is ``max|ours - reference| / max|reference|`` over the whole output. Tolerances:

* float32: <= 1e-5 (``F32_TOL``);
* bfloat16 compute (``dtype=bfloat16``, float32 parameters, float32 reference): <= 2e-2 (``BF16_TOL``; about 7e-3
  measured on these models).

Latents are 3 x 4 x 6 (several frames, non-square), batch 2 with a different timestep per sample.

Large timesteps: the features ``t * freqs`` reach ``t`` radians, so one ulp in a frequency moves them by ~1e-5 at
t = 999. The timestep frequency table is checked entry by entry against diffusers' (float32, PyTorch's ``exp``),
and T2V models with 5 heads of 12 and frequency dimensions 16 and 24 are compared at t = 3, 999 and 1000.
"""

import json
import math
import os

import diffusers
from diffusers.models.embeddings import get_timestep_embedding
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from onestory_jax import convert
from onestory_jax import weights
from onestory_jax.models.wan import dit as wan_dit
from tests.helpers import TINY_WAN_DIT

F32_TOL = 1e-5
BF16_TOL = 2e-2

HEADS, HEAD_DIM, FFN, LAYERS, FREQ = (
    TINY_WAN_DIT[k] for k in ("num_attention_heads", "attention_head_dim", "ffn_dim", "num_layers", "freq_dim")
)
DIM = HEADS * HEAD_DIM
TEXT_DIM, IMAGE_DIM, Z = 24, 20, 4
LATENT = (3, 4, 6)  # latent frames, height, width
TOKENS = LATENT[0] * (LATENT[1] // 2) * (LATENT[2] // 2)
B = 2
I2V_TEXT_LEN = 512  # diffusers' Wan attention assumes exactly 512 text tokens when image cross-attention is on
LARGE_T_FREQS = (16, 24)  # timestep frequency dimensions (freq_dim) of the large-timestep parity tests


def rel_err(ours, ref) -> float:
  """max|ours - ref| / max|ref|."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def reference(seed: int, **cfg) -> diffusers.WanTransformer3DModel:
  """A tiny random reference; every parameter gets noise so no norm is identity and no bias zero."""
  torch.manual_seed(seed)
  kw = dict(TINY_WAN_DIT, in_channels=Z, out_channels=Z, text_dim=TEXT_DIM)
  kw.update(cfg)
  model = diffusers.WanTransformer3DModel(**kw).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.3 * torch.randn_like(p))
  return model


def convert_and_load(ref, tmp_dir, *, scanned=False, **overrides):
  """Saves ``ref`` as a release, converts it, loads it; returns (our module, params)."""
  src, dst = os.path.join(tmp_dir, "release"), os.path.join(tmp_dir, "converted")
  if not os.path.exists(src):
    ref.save_pretrained(os.path.join(src, "transformer"), safe_serialization=True)
  entry = convert.convert_component(src, dst, "transformer", scanned=scanned, overwrite=True, log=lambda _: None)
  assert entry["status"] == "ok", entry
  with open(os.path.join(src, "transformer", "config.json")) as f:
    cfg = json.load(f)
  model = wan_dit.dit_from_diffusers(cfg, scan_layers=scanned, **overrides)
  return model, weights.load_converted(dst, "transformer", wan_dit.abstract_params(model))


def make_inputs(seed, *, in_channels, text_len, image_len=None, t=(10.0, 700.0)):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((B, in_channels) + LATENT).astype(np.float32)  # torch layout [B, C, F, H, W]
  text = rng.standard_normal((B, text_len, TEXT_DIM)).astype(np.float32)
  image = None if image_len is None else rng.standard_normal((B, image_len, IMAGE_DIM)).astype(np.float32)
  return x, np.asarray(t, np.float32), text, image


def run_ref(ref, x, t, text, image=None) -> np.ndarray:
  """The reference output, channels last [B, F, H, W, C]."""
  with torch.no_grad():
    out = ref(
        torch.from_numpy(x),
        torch.from_numpy(t),
        torch.from_numpy(text),
        None if image is None else torch.from_numpy(image),
        return_dict=False,
    )[0]
  return out.numpy().transpose(0, 2, 3, 4, 1)


def jax_fn(model):
  return jax.jit(
      lambda p, x, t, text, image=None, **kw: model.apply(
          {"params": p}, jnp.asarray(x).transpose(0, 2, 3, 4, 1), t, text, image, **kw
      )
  )


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def t2v(tmp_path_factory):
  ref = reference(0)
  model, params = convert_and_load(ref, str(tmp_path_factory.mktemp("t2v")))
  return ref, model, params, jax_fn(model)


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
  ref = reference(1, in_channels=2 * Z + 4, image_dim=IMAGE_DIM, added_kv_proj_dim=DIM)
  tmp = str(tmp_path_factory.mktemp("i2v"))
  model, params = convert_and_load(ref, tmp)
  return ref, model, params, jax_fn(model), tmp


@pytest.fixture(scope="module", params=LARGE_T_FREQS, ids=lambda f: f"freq{f}")
def t2v_5x12(request, tmp_path_factory):
  """T2V with 5 heads of 12 (head_dim 12: 3D RoPE splits it 4/4/4) and the timestep frequency dimension given."""
  ref = reference(3, num_attention_heads=5, attention_head_dim=12, freq_dim=request.param)
  model, params = convert_and_load(ref, str(tmp_path_factory.mktemp(f"t2v_5x12_freq{request.param}")))
  assert model.freq_dim == request.param and model.head_dim == 12
  return ref, model, params, jax_fn(model)


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory):
  ref = reference(2)
  model, params = convert_and_load(ref, str(tmp_path_factory.mktemp("ti2v")))
  return ref, model, params, jax_fn(model)


# ----------------------------------------------------------------------------- parity


def test_t2v_parity(t2v):
  ref, _, params, fwd = t2v
  x, t, text, _ = make_inputs(0, in_channels=Z, text_len=7)
  expected = run_ref(ref, x, t, text)
  assert rel_err(fwd(params, x, t, text), expected) <= F32_TOL
  # The two samples have different timesteps and inputs: the comparison is not between constants.
  assert rel_err(expected[1], expected[0]) > 0.1


def _torch_timestep_frequencies(dim: int, max_period: float = 10000.0) -> np.ndarray:
  """The frequency table of diffusers' ``get_timestep_embedding`` (downscale_freq_shift=0, as Wan), line by line."""
  half = dim // 2
  exponent = -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32)
  return torch.exp(exponent / (half - 0)).numpy()


def test_timestep_frequencies_equal_the_reference_table():
  for dim in LARGE_T_FREQS + (8, 32):
    np.testing.assert_array_equal(
        wan_dit.timestep_frequencies(dim), _torch_timestep_frequencies(dim), err_msg=f"dim {dim}"
    )
  # Ours is the float32 rounding of the exact exponential; PyTorch's float32 exp is 1-ulp accurate, not always
  # correctly rounded, so some widths differ in a few entries (22 and 26 in one, Wan's 256 in 3 of 128), by one
  # ulp and never more.
  for dim in range(2, 1026, 2):
    ours, ref = wan_dit.timestep_frequencies(dim), _torch_timestep_frequencies(dim)
    ulps = np.abs(ours.view(np.int32).astype(np.int64) - ref.view(np.int32))
    assert ulps.max() <= 1, (dim, ulps)


@pytest.mark.parametrize("dim", LARGE_T_FREQS + (256,))
def test_timestep_features_match_diffusers_at_large_timesteps(dim):
  t = np.asarray([0.0, 1.0, 3.0, 37.5, 500.0, 999.0, 1000.0], np.float32)
  ref = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=True, downscale_freq_shift=0).numpy()
  ours = np.asarray(wan_dit.timestep_embedding(jnp.asarray(t), dim))
  # Identical frequency tables leave only sin / cos rounding (one float32 ulp of the features); 256 has the
  # reference's three off-by-one-ulp frequencies, each worth t * ulp(freq) ~ 2e-5 at t = 999.
  np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-7 if dim <= 32 else 5e-5)


@pytest.mark.parametrize("t", (3.0, 999.0, 1000.0))
def test_t2v_parity_at_small_and_large_timesteps(t2v_5x12, t):
  ref, _, params, fwd = t2v_5x12
  x, _, text, _ = make_inputs(7, in_channels=Z, text_len=7)
  ts = np.asarray([t, t], np.float32)
  assert rel_err(fwd(params, x, ts, text), run_ref(ref, x, ts, text)) <= F32_TOL


def test_i2v_parity_with_timestep_text_and_image_conditioning(i2v):
  ref, _, params, fwd, _ = i2v
  x, t, text, image = make_inputs(1, in_channels=2 * Z + 4, text_len=I2V_TEXT_LEN, image_len=5)
  base = run_ref(ref, x, t, text, image)
  assert rel_err(fwd(params, x, t, text, image), base) <= F32_TOL
  rng = np.random.default_rng(11)
  variants = {
      "timestep": (x, np.asarray([400.0, 3.0], np.float32), text, image),
      "text": (x, t, rng.standard_normal(text.shape).astype(np.float32), image),
      "image": (x, t, text, rng.standard_normal(image.shape).astype(np.float32)),
      "first-frame channels": (
          np.concatenate([x[:, :Z], rng.standard_normal(x[:, Z:].shape).astype(np.float32)], 1),
          t,
          text,
          image,
      ),
  }
  for name, args in variants.items():
    expected = run_ref(ref, *args)
    assert rel_err(expected, base) > 1e-3, f"{name} does not change the reference output"
    assert rel_err(fwd(params, *args), expected) <= F32_TOL, name


def test_scanned_layout_gives_the_same_output(i2v):
  ref, _, params, fwd, tmp = i2v
  model_s, params_s = convert_and_load(ref, tmp, scanned=True)
  assert params_s["blocks"]["attn1"]["to_q"]["kernel"].shape == (LAYERS, DIM, DIM)
  for i in range(LAYERS):
    np.testing.assert_array_equal(
        np.asarray(params_s["blocks"]["ffn"]["net_0"]["proj"]["kernel"][i]),
        np.asarray(params[f"blocks_{i}"]["ffn"]["net_0"]["proj"]["kernel"]),
    )
  x, t, text, image = make_inputs(2, in_channels=2 * Z + 4, text_len=I2V_TEXT_LEN, image_len=5)
  out_s = jax_fn(model_s)(params_s, x, t, text, image)
  assert rel_err(out_s, fwd(params, x, t, text, image)) <= 1e-6
  assert rel_err(out_s, run_ref(ref, x, t, text, image)) <= F32_TOL


def test_ti2v_per_token_timesteps_parity(ti2v):
  """Wan2.2-TI2V: one timestep per noise token, first latent frame at t = 0 (diffusers' ``expand_timesteps``)."""
  ref, _, params, fwd = ti2v
  x, _, text, _ = make_inputs(3, in_channels=Z, text_len=9)
  first_frame = np.arange(TOKENS) < TOKENS // LATENT[0]  # raster order: frame 0 first
  ts = np.stack([np.where(first_frame, 0.0, 600.0), np.where(first_frame, 0.0, 35.0)]).astype(np.float32)
  expected = run_ref(ref, x, ts, text)
  assert rel_err(fwd(params, x, ts, text), expected) <= F32_TOL
  # Per-token timesteps do act token by token: the clean first frame differs from a uniform timestep.
  uniform = run_ref(ref, x, np.asarray([600.0, 35.0], np.float32), text)
  assert rel_err(expected[:, 0], uniform[:, 0]) > 1e-3


def test_per_token_timesteps_equal_per_sample_when_constant(ti2v):
  """Our module: a constant [B, N] timestep equals the [B] one, also with OneStory context tokens appended."""
  _, _, params, fwd = ti2v
  x, t, text, _ = make_inputs(4, in_channels=Z, text_len=9)
  ts = np.repeat(t[:, None], TOKENS, axis=1)
  rng = np.random.default_rng(5)
  ctx = dict(
      context=jnp.asarray(rng.standard_normal((B, 4, DIM)), jnp.float32),
      context_pos=jnp.asarray(rng.uniform(-3, 3, (B, 4, 3)), jnp.float32),
      context_mask=jnp.asarray([[True, True, False, True], [True, False, True, True]]),
  )
  with_ctx = fwd(params, x, ts, text, **ctx)
  assert rel_err(with_ctx, fwd(params, x, t, text, **ctx)) <= 1e-6
  assert rel_err(with_ctx, fwd(params, x, ts, text)) > 1e-3  # the context tokens are live


def test_bf16_compute_error_is_bounded(i2v):
  ref, model, params, _, _ = i2v
  model_bf16 = model.clone(dtype=jnp.bfloat16)  # bf16 compute, float32 parameters (the converted ones)
  x, t, text, image = make_inputs(6, in_channels=2 * Z + 4, text_len=I2V_TEXT_LEN, image_len=5)
  out = jax_fn(model_bf16)(params, x, t, text, image)
  assert out.dtype == jnp.bfloat16
  err = rel_err(out, run_ref(ref, x, t, text, image))
  assert 1e-5 < err <= BF16_TOL, err  # bf16 really ran, and stays within the stated bound


# ----------------------------------------------------------------------------- key map and config


def test_key_map_targets_and_errors():
  t = wan_dit.torch_key_to_target("blocks.1.attn2.to_out.0.weight", num_layers=2, scanned=False)
  assert t.path == ("blocks_1", "attn2", "to_out_0", "kernel") and t.layer is None
  assert t.transform(np.zeros((3, 5))).shape == (5, 3)
  t = wan_dit.torch_key_to_target("blocks.1.ffn.net.0.proj.bias", num_layers=2, scanned=True)
  assert t.path == ("blocks", "ffn", "net_0", "proj", "bias") and t.layer == 1
  t = wan_dit.torch_key_to_target("blocks.0.attn1.norm_q.weight", num_layers=2, scanned=True)
  assert t.path == ("blocks", "attn1", "norm_q", "scale") and t.layer == 0
  t = wan_dit.torch_key_to_target("patch_embedding.weight", num_layers=2, scanned=True)
  assert t.path == ("patch_embedding", "kernel") and t.layer is None
  assert t.transform(np.zeros((8, 4, 1, 2, 3))).shape == (1, 2, 3, 4, 8)
  assert wan_dit.torch_key_to_target("scale_shift_table", num_layers=2, scanned=True).path == ("scale_shift_table",)
  # Ignored by the reference itself.
  assert wan_dit.torch_key_to_target("blocks.0.attn2.norm_added_q.weight", num_layers=2, scanned=False) is None
  for bad in (
      "blocks.0.attn1.to_qkv.weight",
      "condition_embedder.image_embedder.pos_embed",
      "blocks.2.norm2.weight",
      "proj_out.scale",
      "norm_out.weight",
      "blocks.0.norm2",
  ):
    with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
      wan_dit.torch_key_to_target(bad, num_layers=2, scanned=False)


def test_config_from_diffusers_and_mismatches(i2v):
  ref = i2v[0]
  cfg = dict(ref.config)
  got = wan_dit.config_from_diffusers(cfg)
  sizes = dict(
      dim=DIM,
      ffn_dim=FFN,
      num_heads=HEADS,
      num_layers=LAYERS,
      patch_size=(1, 2, 2),
      freq_dim=FREQ,
      eps=1e-6,
      qk_norm=True,
      cross_attn_norm=True,
      rope_theta=10000.0,
  )
  assert got == dict(sizes, in_channels=2 * Z + 4, out_channels=Z, text_dim=TEXT_DIM, image_dim=IMAGE_DIM)
  model_cfg = dict(sizes, num_layers=3, dtype="float32")
  assert wan_dit.config_mismatches(model_cfg, cfg, text_dim=TEXT_DIM) == [
      "model.num_layers: run config has 3, the release has 2"
  ]
  assert wan_dit.config_mismatches(dict(model_cfg, num_layers=2), cfg, in_channels=2 * Z + 4) == []
  with pytest.raises(ValueError, match="pos_embed_seq_len"):
    wan_dit.config_from_diffusers(dict(cfg, pos_embed_seq_len=514))
  with pytest.raises(ValueError, match="added_kv_proj_dim"):
    wan_dit.config_from_diffusers(dict(cfg, added_kv_proj_dim=None))
  with pytest.raises(ValueError, match="missing fields"):
    wan_dit.config_from_diffusers({k: v for k, v in cfg.items() if k != "ffn_dim"})
