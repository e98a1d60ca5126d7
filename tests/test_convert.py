"""``python -m onestory_jax.convert`` and the safetensors / validation / loading helpers of ``onestory_jax.weights``.

The release is a tiny random diffusers ``WanTransformer3DModel`` (I2V, 2 layers) saved with ``save_pretrained`` and a
small ``max_shard_size``, so it has several shards and an index, like the published 14B checkpoints. Output parity
uses the relative error of tests/test_parity_wan_dit.py: ``max|ours - reference| / max|reference|`` <= 1e-5 (f32).
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from onestory_jax import convert
from onestory_jax import sharding
from onestory_jax import weights
from onestory_jax.models.wan import dit as wan_dit
from tests.helpers import load_config
from tests.helpers import ROOT
from tests.test_parity_wan_dit import DIM
from tests.test_parity_wan_dit import F32_TOL
from tests.test_parity_wan_dit import I2V_TEXT_LEN
from tests.test_parity_wan_dit import IMAGE_DIM
from tests.test_parity_wan_dit import jax_fn
from tests.test_parity_wan_dit import LAYERS
from tests.test_parity_wan_dit import make_inputs
from tests.test_parity_wan_dit import reference
from tests.test_parity_wan_dit import rel_err
from tests.test_parity_wan_dit import run_ref
from tests.test_parity_wan_dit import Z

IN_CH = 2 * Z + 4


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  """(reference model, release dir) with a sharded transformer/ directory."""
  ref = reference(7, in_channels=IN_CH, image_dim=IMAGE_DIM, added_kv_proj_dim=DIM)
  src = str(tmp_path_factory.mktemp("release"))
  ref.save_pretrained(os.path.join(src, "transformer"), safe_serialization=True, max_shard_size="60KB")
  return ref, src


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
  """Runs the CLI (in-process) on the sharded release; returns (dst, exit status, report)."""
  _, src = release
  dst = str(tmp_path_factory.mktemp("converted"))
  rc = convert.main([f"--src={src}", f"--dst={dst}", "--batch_mb=0.02"])
  with open(os.path.join(dst, "report.json")) as f:
    return dst, rc, json.load(f)


def state_dict(ref) -> dict[str, torch.Tensor]:
  return {k: v.detach().clone().contiguous() for k, v in ref.state_dict().items()}


def write_release(root: str, ref, tensors: dict[str, torch.Tensor]) -> str:
  """A single-file release with the given tensors and ``ref``'s config."""
  os.makedirs(os.path.join(root, "transformer"))
  safetensors.torch.save_file(tensors, os.path.join(root, "transformer", "diffusion_pytorch_model.safetensors"))
  with open(os.path.join(root, "transformer", "config.json"), "w") as f:
    json.dump(dict(ref.config), f)
  return root


# ----------------------------------------------------------------------------- the command


def test_multishard_release_converts_and_matches_reference(release, converted):
  ref, src = release
  dst, rc, report = converted
  shards = [f for f in os.listdir(os.path.join(src, "transformer")) if f.endswith(".safetensors")]
  assert len(shards) >= 3 and os.path.exists(
      os.path.join(src, "transformer", "diffusion_pytorch_model.safetensors.index.json")
  )
  assert rc == 0 and report["ok"]
  entry = report["components"]["transformer"]
  assert entry["status"] == "ok" and entry["valid"]
  assert entry["missing"] == entry["unexpected"] == entry["shape_mismatches"] == entry["conflicts"] == []
  assert len(entry["files"]) == len(shards) and entry["tensors"] == entry["tensors_in_source"] == len(ref.state_dict())
  # Memory: measured and reported; at most a small part of the checkpoint was held at once.
  for key in ("rss_before_bytes", "peak_rss_bytes", "maxrss_bytes"):
    assert report[key] > 0, key
  assert entry["peak_rss_bytes"] > 0 and entry["batches"] >= 3
  # One batch (--batch_mb) plus the parameter being read and converted.
  assert 0 < entry["peak_live_bytes"] <= 0.02 * 2**20 + 2 * entry["largest_parameter_bytes"]
  assert entry["peak_live_bytes"] < entry["checkpoint_bytes"] / 2
  with open(os.path.join(dst, "transformer.config.json")) as f:
    assert json.load(f) == json.load(open(os.path.join(src, "transformer", "config.json")))

  model = wan_dit.dit_from_diffusers(dict(ref.config))
  params = weights.load_converted(dst, "transformer", wan_dit.abstract_params(model))
  x, t, text, image = make_inputs(21, in_channels=IN_CH, text_len=I2V_TEXT_LEN, image_len=4)
  assert rel_err(jax_fn(model)(params, x, t, text, image), run_ref(ref, x, t, text, image)) <= F32_TOL


def test_load_converted_places_parameters_sharded(release, converted):
  ref, _ = release
  dst = converted[0]
  model = wan_dit.dit_from_diffusers(dict(ref.config))
  config = load_config("tiny")
  mesh = jax.make_mesh((1, 8, 1, 1), config.mesh.axes, axis_types=(jax.sharding.AxisType.Auto,) * 4)
  shardings = sharding.logical_to_shardings(wan_dit.abstract_params(model, boxed=True), mesh, config)
  params = weights.load_converted(dst, "transformer", wan_dit.abstract_params(model, boxed=True), shardings)
  q = params["blocks_1"]["attn1"]["to_q"]["kernel"]  # logical (embed, heads): embed -> fsdp (8 devices)
  assert q.sharding.spec[0] == "fsdp"
  assert {s.data.shape for s in q.addressable_shards} == {(DIM // 8, DIM)}
  expected = ref.state_dict()["blocks.1.attn1.to_q.weight"].numpy().T
  np.testing.assert_array_equal(np.asarray(q), expected)
  # A model of another size is refused with the differences listed.
  other = wan_dit.dit_from_diffusers(dict(ref.config, num_layers=3))
  with pytest.raises(ValueError, match="blocks_2/attn1/to_q/kernel"):
    weights.load_converted(dst, "transformer", wan_dit.abstract_params(other))
  with pytest.raises(ValueError, match="no converted 'vae' checkpoint"):
    weights.load_converted(dst, "vae", {})


def test_scan_layers_stacks_blocks_and_loads_sharded(release, tmp_path):
  ref, src = release
  dst = str(tmp_path / "scanned")
  os.makedirs(os.path.join(dst, "transformer.converting-1", "x"))  # left over by an interrupted run
  assert convert.main([f"--src={src}", f"--dst={dst}", "--components=transformer", "--scan_layers"]) == 0
  assert sorted(os.listdir(dst)) == ["report.json", "transformer", "transformer.config.json"]
  model = wan_dit.dit_from_diffusers(dict(ref.config), scan_layers=True)
  config = load_config("tiny")
  mesh = jax.make_mesh((1, 8, 1, 1), config.mesh.axes, axis_types=(jax.sharding.AxisType.Auto,) * 4)
  boxed = wan_dit.abstract_params(model, boxed=True)
  params = weights.load_converted(dst, "transformer", boxed, sharding.logical_to_shardings(boxed, mesh, config))
  kernel = params["blocks"]["ffn"]["net_0"]["proj"]["kernel"]  # (layers, embed, mlp)
  assert kernel.shape == (LAYERS, DIM, 64)
  assert {s.data.shape for s in kernel.addressable_shards} == {(LAYERS, DIM // 8, 64)}
  sd = ref.state_dict()
  for i in range(LAYERS):
    np.testing.assert_array_equal(np.asarray(kernel[i]), sd[f"blocks.{i}.ffn.net.0.proj.weight"].numpy().T)
    np.testing.assert_array_equal(
        np.asarray(params["blocks"]["scale_shift_table"][i]), sd[f"blocks.{i}.scale_shift_table"].numpy()
    )


def test_bf16_release_keeps_its_dtype_unless_told(tmp_path):
  ref = reference(8).to(torch.bfloat16)
  src = str(tmp_path / "release")
  ref.save_pretrained(os.path.join(src, "transformer"), safe_serialization=True)
  assert convert.main([f"--src={src}", f"--dst={tmp_path / 'stored'}"]) == 0
  assert convert.main([f"--src={src}", f"--dst={tmp_path / 'f32'}", "--dtype=float32"]) == 0
  stored = ocp.metadata(str(tmp_path / "stored" / "transformer")).metadata
  cast = ocp.metadata(str(tmp_path / "f32" / "transformer")).metadata
  assert stored["proj_out"]["kernel"].dtype == ml_dtypes.bfloat16
  assert cast["proj_out"]["kernel"].dtype == np.float32
  report = json.load(open(tmp_path / "stored" / "report.json"))["components"]["transformer"]
  assert report["source_dtypes"] == ["bfloat16"] and set(report["dtypes"]) == {"bfloat16"}
  # Loading casts to the model's parameter dtype; values are the reference's bf16 values exactly.
  model = wan_dit.dit_from_diffusers(dict(ref.config))
  params = weights.load_converted(str(tmp_path / "stored"), "transformer", wan_dit.abstract_params(model))
  w = params["blocks_0"]["attn2"]["to_k"]["kernel"]
  assert w.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(w), ref.state_dict()["blocks.0.attn2.to_k.weight"].float().numpy().T)


@pytest.mark.parametrize("case", ["missing", "unexpected", "shape"])
def test_validation_reports_bad_checkpoints(release, tmp_path, case, capsys):
  ref, _ = release
  tensors = state_dict(ref)
  if case == "missing":
    del tensors["blocks.1.attn1.to_q.weight"]
  elif case == "unexpected":
    tensors["blocks.0.attn1.to_qkv.weight"] = torch.zeros(3 * DIM, DIM)
  else:
    tensors["blocks.0.ffn.net.0.proj.weight"] = torch.zeros(48, DIM)
  src = write_release(str(tmp_path / "bad"), ref, tensors)
  dst = str(tmp_path / "out")
  assert convert.main([f"--src={src}", f"--dst={dst}"]) == 1
  entry = json.load(open(os.path.join(dst, "report.json")))["components"]["transformer"]
  assert entry["status"] == "invalid" and not entry["valid"]
  assert not os.path.exists(os.path.join(dst, "transformer"))  # nothing is written for an invalid component
  out = capsys.readouterr()
  if case == "missing":
    assert entry["missing"] == ["blocks_1/attn1/to_q/kernel"]
    assert "missing keys (1)" in out.out and "blocks_1/attn1/to_q/kernel" in out.out
  elif case == "unexpected":
    assert [u["key"] for u in entry["unexpected"]] == ["blocks.0.attn1.to_qkv.weight"]
    assert "blocks.0.attn1.to_qkv.weight" in out.out and entry["missing"] == []
  else:
    assert entry["shape_mismatches"] == [
        {
            "key": "blocks.0.ffn.net.0.proj.weight",
            "target": "blocks_0/ffn/net_0/proj/kernel",
            "expected": [DIM, 64],
            "got": [DIM, 48],
        }
    ]
  assert "FAILED" in out.err


def test_cli_rejects_bad_arguments(release, converted, tmp_path):
  _, src = release
  with pytest.raises(ValueError, match="unknown"):
    convert.main([f"--src={src}", f"--dst={tmp_path}", "--components=transformer,unet"])
  with pytest.raises(ValueError, match="exists; pass --overwrite"):
    convert.main([f"--src={src}", f"--dst={converted[0]}", "--components=transformer"])
  with pytest.raises(ValueError, match="not a directory"):
    convert.main([f"--src={tmp_path / 'nothing'}", f"--dst={tmp_path}"])
  with pytest.raises(ValueError, match="no vae/ directory"):
    convert.main([f"--src={src}", f"--dst={tmp_path}", "--components=vae"])
  with pytest.raises(ValueError, match="--dtype"):
    convert.main([f"--src={src}", f"--dst={tmp_path}", "--dtype=int8"])
  # As a command: a clear message and exit status 2.
  proc = subprocess.run(
      [sys.executable, "-m", "onestory_jax.convert", f"--src={tmp_path / 'nothing'}", f"--dst={tmp_path}"],
      capture_output=True,
      text=True,
      cwd=ROOT,
      check=False,
  )
  assert proc.returncode == 2 and "error: --src=" in proc.stderr and "not a directory" in proc.stderr


# ----------------------------------------------------------------------------- weights helpers


def test_safetensors_reader(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {
      "a": rng.standard_normal((3, 5)).astype(np.float32),
      "b": np.arange(7, dtype=np.int64),
      "c": rng.standard_normal((2, 2, 2)).astype(np.float16),
      "empty": np.zeros((0, 4), np.float32),
  }
  path = str(tmp_path / "x.safetensors")
  safetensors.numpy.save_file(arrays, path)
  infos = weights.read_safetensors_header(path)
  for name, value in arrays.items():
    got = weights.read_tensor(infos[name])
    assert got.dtype == value.dtype and got.shape == value.shape
    np.testing.assert_array_equal(got, value)
  bf16 = torch.randn(4, 3).to(torch.bfloat16)
  safetensors.torch.save_file({"w": bf16}, str(tmp_path / "y.safetensors"))
  got = weights.read_tensor(weights.read_safetensors_header(str(tmp_path / "y.safetensors"))["w"])
  assert got.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(got.astype(np.float32), bf16.float().numpy())
  # Corrupt files are refused with the file named.
  data = open(path, "rb").read()
  open(tmp_path / "trunc.safetensors", "wb").write(data[:-8])
  with pytest.raises(ValueError, match="trunc.safetensors"):
    weights.read_safetensors_header(str(tmp_path / "trunc.safetensors"))
  open(tmp_path / "junk.safetensors", "wb").write(b"\x05\x00\x00\x00\x00\x00\x00\x00hello")
  with pytest.raises(ValueError, match="not JSON"):
    weights.read_safetensors_header(str(tmp_path / "junk.safetensors"))
  # Pickled checkpoints are never read; an index must name existing shards.
  os.makedirs(tmp_path / "pickles")
  open(tmp_path / "pickles" / "diffusion_pytorch_model.bin", "wb").write(b"\x80")
  with pytest.raises(ValueError, match="never loaded"):
    weights.index_safetensors(str(tmp_path / "pickles"), "diffusion_pytorch_model")
  os.makedirs(tmp_path / "idx")
  shutil.copy(path, tmp_path / "idx" / "model-00001-of-00002.safetensors")
  json.dump(
      {"weight_map": {"a": "model-00001-of-00002.safetensors", "z": "model-00002-of-00002.safetensors"}},
      open(tmp_path / "idx" / "model.safetensors.index.json", "w"),
  )
  with pytest.raises(ValueError, match="model-00002-of-00002"):
    weights.index_safetensors(str(tmp_path / "idx"), "model")


def test_plan_conversion_stacked_layers_and_conflicts(tmp_path):
  path = str(tmp_path / "s.safetensors")
  safetensors.numpy.save_file(
      {
          "l.0.w": np.zeros((2, 3), np.float32),
          "l.2.w": np.zeros((2, 3), np.float32),
          "l.5.w": np.zeros((2, 3), np.float32),
          "other.w": np.zeros((2, 3), np.float32),
          "skip": np.zeros(1, np.float32),
      },
      path,
  )
  tensors = weights.read_safetensors_header(path)

  def key_map(name):
    if name == "skip":
      return None
    if name == "other.w":  # a second source for layer 0
      return weights.Target(("stack", "kernel"), weights.linear, 0)
    return weights.Target(("stack", "kernel"), weights.linear, int(name.split(".")[1]))

  abstract = {
      "stack": {"kernel": jax.ShapeDtypeStruct((3, 3, 2), jnp.float32)},
      "bias": jax.ShapeDtypeStruct((2,), jnp.float32),
  }
  plan = weights.plan_conversion(tensors, key_map, abstract)
  assert not plan.ok
  assert plan.ignored == ["skip"]
  assert [k for k, _ in plan.unexpected] == ["l.5.w"]  # no layer 5 in a 3-layer stack
  assert [k for k, _ in plan.conflicts] == ["other.w"]
  assert plan.missing == ["stack/kernel[layer 1]", "bias"]
  assert "missing keys (2)" in plan.summary()
