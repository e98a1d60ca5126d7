"""Parity of the DINOv2 port (onestory_jax.models.dinov2) with transformers' Dinov2Model / Dinov2WithRegistersModel.

Tiny random reference models are written with ``save_pretrained`` (config.json + model.safetensors, the published
key layout) and read back with :func:`dinov2.load_dinov2`. LayerNorm affines, LayerScales, the mask token, the
register tokens and the position embeddings are perturbed away from their initial values so that each one matters
(position embeddings are scaled up so that a wrong interpolation shows in the outputs).

Relative error is ``max|ours - ref| / max|ref|`` over the whole output tensor (the metric of
tests/test_parity_clip.py); float32 bound 1e-5.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from onestory_jax import convert
from onestory_jax import weights
from onestory_jax.models import dinov2 as dv

F32_TOL = 1e-5
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=4, image_size=16)


def rel_err(ours, ref) -> float:
  """max|ours - ref| / max|ref| (the parity metric of the port tests)."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _reference(registers: bool = False, seed: int = 0, **overrides):
  torch.manual_seed(seed)
  kw = dict(TINY, **overrides)
  if registers:
    model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**kw))
  else:
    model = Dinov2Model(Dinov2Config(**kw))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or "lambda1" in name or "mask_token" in name or "register_tokens" in name:
        p.add_(0.3 * torch.randn_like(p))
      if "position_embeddings" in name:
        p.mul_(30.0)
  return model.eval()


def _torch_out(model, pixels: np.ndarray, mask: np.ndarray | None = None):
  with torch.no_grad():
    out = model(
        pixel_values=torch.as_tensor(np.transpose(pixels, (0, 3, 1, 2))),
        bool_masked_pos=None if mask is None else torch.as_tensor(mask),
    )
  return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def _pixels(h: int, w: int, seed: int = 1) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((2, h, w, 3)).astype(np.float32)


# ------------------------------------------------------------------ numerical parity
# (name, registers, config overrides, input sizes (H, W)): 16 x 16 is the native grid; the others interpolate the
# position embeddings up (24 x 36), down (8 x 12) and with remainders the patch convolution drops (13 x 18).
CASES = [
    ("plain", False, {}, [(16, 16), (24, 36)]),
    ("layerscale", False, dict(layerscale_value=0.25), [(16, 16), (24, 36), (8, 12), (13, 18)]),
    ("swiglu", False, dict(use_swiglu_ffn=True, layerscale_value=0.5), [(16, 16), (20, 12)]),
    ("no_qkv_bias_no_mask", False, dict(qkv_bias=False, use_mask_token=False, mlp_ratio=2), [(16, 16), (12, 28)]),
    ("registers", True, dict(num_register_tokens=3, layerscale_value=0.5), [(16, 16), (24, 36), (8, 12)]),
    ("registers_swiglu", True, dict(num_register_tokens=2, use_swiglu_ffn=True), [(16, 16), (28, 20)]),
]


@pytest.mark.parametrize("name,registers,overrides,sizes", CASES, ids=[c[0] for c in CASES])
def test_parity_float32(tmp_path, name, registers, overrides, sizes):
  model = _reference(registers, **overrides)
  model.save_pretrained(str(tmp_path), safe_serialization=True)
  module, params = dv.load_dinov2(str(tmp_path))
  assert module.num_register_tokens == (overrides.get("num_register_tokens", 0) if registers else 0)
  assert module.antialias == registers
  apply = jax.jit(module.apply)
  for h, w in sizes:
    pixels = _pixels(h, w)
    ref_last, ref_pooled = _torch_out(model, pixels)
    out = apply({"params": params}, jnp.asarray(pixels))
    assert out.last_hidden_state.shape == ref_last.shape == (2, module.num_tokens(h, w), 32), (h, w)
    assert rel_err(out.last_hidden_state, ref_last) <= F32_TOL, (name, h, w)
    assert rel_err(out.pooler_output, ref_pooled) <= F32_TOL, (name, h, w)


def test_parity_mask_token_and_blocked_attention(tmp_path):
  model = _reference(registers=True, num_register_tokens=2)
  model.save_pretrained(str(tmp_path), safe_serialization=True)
  module, params = dv.load_dinov2(str(tmp_path))
  pixels = _pixels(20, 16)
  mask = np.random.default_rng(3).random((2, 5 * 4)) < 0.4
  ref_last, ref_pooled = _torch_out(model, pixels, mask)
  out = jax.jit(module.apply)({"params": params}, jnp.asarray(pixels), jnp.asarray(mask))
  assert rel_err(out.last_hidden_state, ref_last) <= F32_TOL
  assert rel_err(out.pooler_output, ref_pooled) <= F32_TOL
  blocked = jax.jit(module.clone(attention="blocked").apply)({"params": params}, jnp.asarray(pixels), jnp.asarray(mask))
  assert rel_err(blocked.last_hidden_state, ref_last) <= F32_TOL
  with pytest.raises(ValueError, match="bool_masked_pos"):
    module.apply({"params": params}, jnp.asarray(pixels), jnp.ones((2, 7), bool))
  with pytest.raises(ValueError, match="pixels"):
    module.apply({"params": params}, jnp.zeros((1, 16, 16)))


@pytest.mark.parametrize("antialias", [False, True])
def test_bicubic_matrix_matches_torch_interpolate(antialias):
  rng = np.random.default_rng(0)
  for g, (gh, gw) in [(4, (6, 9)), (4, (3, 2)), (37, (16, 30)), (5, (5, 5)), (3, (1, 7)), (37, (37, 60))]:
    grid = rng.standard_normal((1, 8, g, g)).astype(np.float32)
    ref = torch.nn.functional.interpolate(
        torch.as_tensor(grid), size=(gh, gw), mode="bicubic", align_corners=False, antialias=antialias
    ).numpy()
    ours = np.einsum(
        "hi,cij,wj->chw", dv.bicubic_matrix(g, gh, antialias), grid[0], dv.bicubic_matrix(g, gw, antialias)
    )
    np.testing.assert_allclose(ours, ref[0], rtol=0, atol=F32_TOL * np.abs(ref).max(), err_msg=f"{g} -> {(gh, gw)}")
  np.testing.assert_allclose(dv.bicubic_matrix(7, 7, antialias), np.eye(7), atol=1e-12)


# ------------------------------------------------------------------ key map, config, loader errors
def test_key_map_round_trip_and_errors(tmp_path):
  model = _reference(registers=True, num_register_tokens=2, use_swiglu_ffn=True)
  model.save_pretrained(str(tmp_path), safe_serialization=True)
  names = sorted(weights.index_safetensors(str(tmp_path), "model"))
  assert "encoder.layer.1.attention.attention.query.weight" in names and "embeddings.register_tokens" in names
  for name in names:
    target = dv.torch_key_to_target(name)
    assert dv.target_to_torch_key(target.path) == name
  t = dv.torch_key_to_target("encoder.layer.1.attention.output.dense.weight")
  assert t.path == ("encoder", "layer_1", "attention", "output", "kernel")
  w = np.arange(12.0).reshape(3, 4)
  np.testing.assert_array_equal(t.transform(w), w.T)
  conv = dv.torch_key_to_target("embeddings.patch_embeddings.projection.weight")
  w = np.random.default_rng(0).standard_normal((32, 3, 4, 4))
  np.testing.assert_array_equal(conv.transform(w)[1, 2, 0], w[:, 0, 1, 2])
  assert dv.torch_key_to_target("dinov2.layernorm.weight").path == ("layernorm", "scale")
  assert dv.torch_key_to_target("classifier.weight") is None
  for bad in (
      "encoder.layer.0.attention.q_proj.weight",
      "encoder.layer.0.mlp.gate_proj.weight",
      "encoder.layer.0.layer_scale1.weight",
      "encoder.layer.x.norm1.weight",
      "pooler.dense.weight",
  ):
    with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
      dv.torch_key_to_target(bad)


def test_config_from_transformers(tmp_path):
  _reference(registers=True, num_register_tokens=3, use_swiglu_ffn=True, layerscale_value=0.5).save_pretrained(
      str(tmp_path), safe_serialization=True
  )
  cfg = dv.read_config(str(tmp_path))
  fields = dv.config_from_transformers(cfg)
  assert fields == dict(
      hidden_size=32,
      num_layers=2,
      num_heads=2,
      patch_size=4,
      image_size=16,
      mlp_ratio=4.0,
      num_channels=3,
      eps=1e-6,
      use_swiglu_ffn=True,
      act="gelu",
      qkv_bias=True,
      layerscale_value=0.5,
      use_mask_token=True,
      num_register_tokens=3,
      antialias=True,
  )
  assert dv.Dinov2Model(**fields).mlp_hidden == dv.swiglu_hidden_size(32, 4) == 88
  plain = dv.config_from_transformers(dict(Dinov2Config(**TINY).to_dict(), image_size=[16, 16]))
  assert plain["image_size"] == 16 and plain["num_register_tokens"] == 0 and not plain["antialias"]
  with pytest.raises(ValueError, match="model_type"):
    dv.config_from_transformers(dict(cfg, model_type="vit"))
  with pytest.raises(ValueError, match="'num_hidden_layers'"):
    dv.config_from_transformers({k: v for k, v in cfg.items() if k != "num_hidden_layers"})
  with pytest.raises(ValueError, match="'image_size'"):
    dv.config_from_transformers(dict(cfg, image_size=[16, 20]))
  with pytest.raises(ValueError, match="hidden_act"):
    dv.config_from_transformers(dict(cfg, use_swiglu_ffn=False, hidden_act="mish"))


def _rewrite(src, dst, edit) -> str:
  """Copies a release folder, passing its tensors through ``edit`` (a dict -> dict function)."""
  os.makedirs(dst)
  shutil.copyfile(os.path.join(src, "config.json"), os.path.join(dst, "config.json"))
  save_file(edit(load_file(os.path.join(src, "model.safetensors"))), os.path.join(dst, "model.safetensors"))
  return str(dst)


def test_loader_errors_name_the_key_and_file(tmp_path):
  src = str(tmp_path / "release")
  _reference().save_pretrained(src, safe_serialization=True)
  missing = "encoder.layer.1.attention.attention.value.weight"
  d = _rewrite(src, tmp_path / "missing", lambda t: {k: v for k, v in t.items() if k != missing})
  with pytest.raises(ValueError, match=r"missing keys \(1\):\n.*" + missing.replace(".", r"\.")):
    dv.load_dinov2(d)
  wrong = "encoder.layer.0.mlp.fc1.weight"
  d = _rewrite(src, tmp_path / "shape", lambda t: {**t, wrong: np.zeros((64, 32), np.float32)})
  with pytest.raises(
      ValueError, match=r"shape mismatches \(1\):\n.*" + wrong.replace(".", r"\.") + r".*stored \[64, 32\]"
  ) as e:
    dv.load_dinov2(d)
  assert "missing" not in str(e.value)
  extra = "encoder.layer.0.attention.q_proj.weight"
  d = _rewrite(src, tmp_path / "extra", lambda t: {**t, extra: np.zeros((32, 32), np.float32)})
  with pytest.raises(ValueError, match="unexpected keys.*\n.*" + extra.replace(".", r"\.")):
    dv.load_dinov2(d)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match=r"config\.json: missing"):
    dv.load_dinov2(str(empty))
  shutil.copyfile(os.path.join(src, "config.json"), empty / "config.json")
  (empty / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(ValueError, match=r"expected model\.safetensors.*pickled torch files are never loaded"):
    dv.load_dinov2(str(empty))
  (empty / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
    dv.load_dinov2(str(empty))
  (empty / "config.json").write_text(json.dumps({"model_type": "dinov2", "hidden_size": 32}))
  with pytest.raises(ValueError, match=r"config\.json: DINOv2 config: field 'num_hidden_layers'"):
    dv.load_dinov2(str(empty))


def test_converter_writes_the_loader_tree(tmp_path):
  src = tmp_path / "aux"
  _reference(registers=True, num_register_tokens=2).save_pretrained(str(src / "dinov2"), safe_serialization=True)
  entry = convert.convert_component(str(src), str(tmp_path / "dst"), "dinov2", log=lambda _: None)
  assert entry["status"] == "ok", entry
  module, params = dv.load_dinov2(str(src / "dinov2"))
  restored = weights.load_converted(str(tmp_path / "dst"), "dinov2", dv.abstract_params(module))
  jax.tree.map(np.testing.assert_array_equal, restored, params)
