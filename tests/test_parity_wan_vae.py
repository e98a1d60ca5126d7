"""Numerical parity of the Flax Wan VAE (onestory_jax/models/wan/vae.py) with diffusers' AutoencoderKLWan.

Tiny random reference VAEs in both published layouts (Wan2.1: plain down / up blocks; Wan2.2: residual blocks and a
2x2 pixel patchify) are built from config objects, saved with ``save_pretrained(safe_serialization=True)`` and
converted through ``wan_vae.torch_key_to_target`` (safetensors read as numpy; nothing is copied by name), so the
name / layout mapping is under test too. Encoding runs 9 frames = frame 0 + 2 chunks of 4 (3 latent frames),
decoding 3 latent frames one chunk each (9 frames).

Relative error := max|ours - reference| / max|reference| over the whole output tensor.
Tolerances: float32 compute <= 1e-5. bfloat16 compute (float32 parameters, float32 reference): encode <= 3e-2,
decode <= 1.5e-1 (the decoder is deeper and its random weights amplify rounding; the reference's own bf16 run errs
by 1.2e-2 / 7.1e-2 on the same inputs), and at most twice the reference's own bf16 error.
"""

import copy
import dataclasses
import json
import math
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from diffusers import AutoencoderKLWan

from onestory_jax.models.wan import vae as wan_vae

TOL_F32 = 1e-5
TOL_BF16_ENCODE = 3e-2
TOL_BF16_DECODE = 1.5e-1
FRAMES = 9  # 1 + 2 chunks of 4 -> 3 latent frames

LAYOUTS = {
    # Wan2.1 layout (plain blocks, stride 4x8x8), non-square 16x24 pixels -> 2x3 latents.
    "wan2.1": (
        dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=2, temperal_downsample=[False, True, True]),
        2,
        (16, 24),
    ),
    # Wan2.2 layout (residual blocks, patchify 2, stride 4x16x16, its own decoder width), 32x48 -> 2x3 latents.
    "wan2.2": (
        dict(
            base_dim=8,
            decoder_base_dim=12,
            z_dim=4,
            dim_mult=[1, 2, 2, 2],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            is_residual=True,
            in_channels=12,
            out_channels=12,
            patch_size=2,
            scale_factor_spatial=16,
        ),
        1,
        (32, 48),
    ),
}


def rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  err = float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))
  print(f"relative error {err:.2e}")
  return err


def _set(tree: dict, path: tuple, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  if path[-1] in tree:
    raise AssertionError(f"two tensors map to {path}")
  tree[path[-1]] = value


@pytest.fixture(scope="module", autouse=True)
def _torch_single_thread():
  """The reference models are tiny: one torch thread is ~20x faster on a shared 2-core machine."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


_BUILT = {}


def _build(kind: str, tmp_path_factory):
  """(kind, torch model, our VAE module, converted params, batch, (H, W)) for one layout, built once per module."""
  if kind in _BUILT:
    return _BUILT[kind]
  cfg, batch, hw = LAYOUTS[kind]
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  cfg = dict(
      cfg,
      latents_mean=rng.normal(size=cfg["z_dim"]).round(3).tolist(),
      latents_std=rng.uniform(0.5, 2.0, size=cfg["z_dim"]).round(3).tolist(),
  )
  model = AutoencoderKLWan(**cfg).eval()
  with torch.no_grad():  # non-trivial norm gains, so that a swapped gamma would show
    for name, p in model.named_parameters():
      if name.endswith("gamma"):
        p.uniform_(0.5, 1.5)
  out = tmp_path_factory.mktemp(kind)
  model.save_pretrained(out, safe_serialization=True)

  with open(os.path.join(out, "config.json")) as f:
    config = wan_vae.config_from_diffusers(json.load(f))
  params = {}
  for name, value in safetensors.numpy.load_file(os.path.join(out, "diffusion_pytorch_model.safetensors")).items():
    target = wan_vae.torch_key_to_target(name)
    assert target.layer is None
    _set(params, target.path, jnp.asarray(target.transform(value)))
  _BUILT[kind] = (kind, model, wan_vae.WanVAE(config), params, batch, hw)
  return _BUILT[kind]


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def reference(request, tmp_path_factory):
  return _build(request.param, tmp_path_factory)


def test_mapping_covers_the_parameter_tree_exactly(reference):
  _, model, vae, params, _, _ = reference
  abstract = flax.traverse_util.flatten_dict(flax.linen.unbox(wan_vae.abstract_params(vae)))
  ours = flax.traverse_util.flatten_dict(params)
  assert sorted(ours) == sorted(abstract)
  for k, v in ours.items():
    assert v.shape == abstract[k].shape, k
  assert len(ours) == len(model.state_dict())


def _video(batch, hw, seed=1):
  return np.random.default_rng(seed).uniform(-1, 1, (batch, 3, FRAMES) + hw).astype(np.float32)


def _encode_decode(vae, params, x, z):
  """Our encode of torch-layout video ``x`` and decode of torch-layout latents ``z``, in torch layout (one jit)."""
  fn = jax.jit(lambda p, v, l: (wan_vae.encode(vae, p, v), wan_vae.decode(vae, p, l)))
  mean, video = fn(params, jnp.asarray(x.transpose(0, 2, 3, 4, 1)), jnp.asarray(z.transpose(0, 2, 3, 4, 1)))
  return mean.transpose(0, 4, 1, 2, 3), video.transpose(0, 4, 1, 2, 3)


def test_encode_decode_parity_float32(reference):
  kind, model, vae, params, batch, hw = reference
  x = _video(batch, hw)
  with torch.no_grad():
    ref_mean = model.encode(torch.from_numpy(x)).latent_dist.mode().numpy()
    z = np.random.default_rng(2).normal(size=ref_mean.shape).astype(np.float32) * 2.0
    ref_video = model.decode(torch.from_numpy(z)).sample.numpy()
  assert ref_mean.shape == (batch, 4, 3, hw[0] // vae.config.stride_hw, hw[1] // vae.config.stride_hw)
  assert ref_video.shape == (batch, 3, FRAMES) + hw
  assert 0.05 < np.mean(np.abs(ref_video) < 1.0)  # the clamp does not hide the decoder

  mean, video = _encode_decode(vae, params, x, z)
  assert rel_err(mean, ref_mean) <= TOL_F32, kind
  assert rel_err(video, ref_video) <= TOL_F32, kind


def test_bfloat16_compute_within_stated_tolerance(tmp_path_factory):
  # bf16 activations and matmuls (float32 parameters; RMS norms and softmax in float32) against the float32
  # reference. The reference itself run in bf16 errs by about as much (here 1.2e-2 encode, 7.1e-2 decode), so the
  # test also bounds ours by twice the reference's own bf16 error. One layout keeps the file fast (the bf16 code
  # path is shared by both).
  _, model, vae, params, batch, hw = _build("wan2.1", tmp_path_factory)
  x = _video(batch, hw, seed=3)
  with torch.no_grad():
    ref_mean = model.encode(torch.from_numpy(x)).latent_dist.mode().numpy()
    z = np.random.default_rng(4).normal(size=ref_mean.shape).astype(np.float32) * 2.0
    ref_video = model.decode(torch.from_numpy(z)).sample.numpy()
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    torch_bf16 = (
        model_bf16.encode(torch.from_numpy(x).bfloat16()).latent_dist.mode().float().numpy(),
        model_bf16.decode(torch.from_numpy(z).bfloat16()).sample.float().numpy(),
    )
  bf16 = wan_vae.WanVAE(vae.config, wan_vae.Numerics(dtype=jnp.bfloat16))
  mean, video = _encode_decode(bf16, params, x, z)
  assert mean.dtype == video.dtype == jnp.bfloat16
  for ours, ref, theirs, tol in (
      (mean, ref_mean, torch_bf16[0], TOL_BF16_ENCODE),
      (video, ref_video, torch_bf16[1], TOL_BF16_DECODE),
  ):
    err = rel_err(ours.astype(jnp.float32), ref)
    assert 1e-5 < err <= tol  # bf16 really ran, and stays within the stated bound
    assert err <= 2.0 * rel_err(theirs, ref)


def test_mapping_examples_and_errors():
  t = wan_vae.torch_key_to_target("encoder.down_blocks.10.conv_shortcut.weight")
  assert t.path == ("encoder", "down_blocks_10", "conv_shortcut", "kernel")
  assert t.transform(np.zeros((8, 4, 1, 1, 1), np.float32)).shape == (1, 1, 1, 4, 8)
  t = wan_vae.torch_key_to_target("decoder.up_blocks.1.upsamplers.0.resample.1.weight")
  assert t.path == ("decoder", "up_blocks_1", "upsamplers_0", "resample_1", "kernel")
  assert t.transform(np.zeros((8, 16, 3, 3), np.float32)).shape == (3, 3, 16, 8)
  t = wan_vae.torch_key_to_target("encoder.mid_block.attentions.0.norm.gamma")
  assert t.path == ("encoder", "mid_block", "attentions_0", "norm", "scale")
  np.testing.assert_array_equal(t.transform(np.arange(3.0).reshape(3, 1, 1)), [0.0, 1.0, 2.0])
  assert wan_vae.torch_key_to_target("quant_conv.bias").path == ("quant_conv", "bias")
  for bad in (
      "encoder.down_blocks.0.conv3.weight",
      "decoder.up_blocks.0.upsamplers.1.time_conv.weight",
      "encoder.conv_in.gamma",
      "vae.encoder.conv_in.weight",
      "decoder.mid_block.resnets.0.norm1.weight",
      "encoder.down_blocks.1.to_qkv.weight",
      "decoder.up_blocks.0.resnets.0.conv1.weight.extra",
  ):
    with pytest.raises(ValueError, match=f"unknown AutoencoderKLWan key '{bad}'"):
      wan_vae.torch_key_to_target(bad)
  with pytest.raises(ValueError, match=r"RMS-norm gamma: expected shape \[C, 1, 1\(, 1\)\], got \(4, 2, 1, 1\)"):
    wan_vae.rms_gamma(np.zeros((4, 2, 1, 1), np.float32))


def test_config_from_diffusers_presets_and_errors():
  assert wan_vae.config_from_diffusers({"_class_name": "AutoencoderKLWan"}) == wan_vae.PRESETS["wan2.1"]
  wan22 = dict(
      base_dim=160,
      decoder_base_dim=256,
      z_dim=48,
      is_residual=True,
      in_channels=12,
      out_channels=12,
      patch_size=2,
      scale_factor_spatial=16,
      scale_factor_temporal=4,
      clip_output=False,
      latents_mean=list(wan_vae.WAN22_LATENTS_MEAN),
      latents_std=list(wan_vae.WAN22_LATENTS_STD),
  )
  cfg = wan_vae.config_from_diffusers(wan22)
  assert cfg == dataclasses.replace(wan_vae.PRESETS["wan2.2"], clip_output=False)
  assert cfg.stride == (4, 16, 16) and wan_vae.PRESETS["wan2.1"].stride == (4, 8, 8)
  with pytest.raises(ValueError, match=r"unknown AutoencoderKLWan config keys \['base_dims'\]"):
    wan_vae.config_from_diffusers({"base_dims": 96})
  with pytest.raises(ValueError, match=r"scale_factor_spatial = 8 contradicts the architecture .* imply 16"):
    wan_vae.config_from_diffusers(dict(wan22, scale_factor_spatial=8))
  with pytest.raises(ValueError, match=r"latents_mean / latents_std: expected 48 values"):
    wan_vae.config_from_diffusers(dict(wan22, latents_std=[1.0] * 16))
  with pytest.raises(ValueError, match=r"attn_scales: expected \[\]"):
    wan_vae.config_from_diffusers({"attn_scales": [1.0]})
  with pytest.raises(ValueError, match=r"temperal_downsample: the chunked causal schedule .* exactly 2"):
    wan_vae.config_from_diffusers({"temperal_downsample": [False, False, True]})


@pytest.mark.parametrize("preset,width_div", [("wan2.1", 1), ("wan2.2", 16)])
def test_presets_match_the_published_state_dict_layout(preset, width_div):
  # The published architectures (on torch's meta device: no weights allocated). Wan2.1 (the paper's VAE) at full
  # size; Wan2.2 with its widths divided by 16 to keep the test fast (same blocks, keys and z_dim).
  cfg = dataclasses.replace(
      wan_vae.PRESETS[preset],
      base_dim=wan_vae.PRESETS[preset].base_dim // width_div,
      decoder_base_dim=wan_vae.PRESETS[preset].decoder_base_dim // width_div,
  )
  kwargs = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "clip_output"}
  kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
  with torch.device("meta"):
    model = AutoencoderKLWan(**kwargs, scale_factor_spatial=cfg.stride_hw)
  abstract = flax.traverse_util.flatten_dict(flax.linen.unbox(wan_vae.abstract_params(wan_vae.WanVAE(cfg))))
  mapped = {}
  for name, value in model.state_dict().items():
    target = wan_vae.torch_key_to_target(name)
    mapped[target.path] = target.transform(np.empty(tuple(value.shape), np.float32)).shape
  assert sorted(mapped) == sorted(abstract)
  assert all(mapped[k] == abstract[k].shape for k in mapped)
  if width_div == 1:
    assert sum(math.prod(s) for s in mapped.values()) == 126_892_531  # Wan2.1's VAE, about 127M parameters
