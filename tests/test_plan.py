"""Analytic FLOPs and MFU (onestory_jax.flops) and the planning tool (onestory_jax.plan).

The libtpu compile is opt-in (marker ``libtpu``; docs/planning.md has the command). Everything else runs on the
8 simulated CPU devices of conftest.py; the 14B config is only traced abstractly.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from onestory_jax import chips
from onestory_jax import flops
from onestory_jax import plan
from onestory_jax import sharding
from onestory_jax import trainer as trainer_lib
from onestory_jax.data import pipeline
from onestory_jax.models.wan import dit as wan_dit
from tests.helpers import load_config

sds = jax.ShapeDtypeStruct


# ---------------------------------------------------------------------------------------------- MFU and peaks
def test_mfu_formula_and_peak_table():
  assert flops.mfu(1e15, 2.0, 4, "v5p") == pytest.approx(1e15 / (2.0 * 4 * 459e12))
  assert flops.mfu(989e12, 1.0, 1, "H100") == pytest.approx(1.0)
  assert chips.get("v6e").peak_bf16_flops == 918e12 and chips.get("a100").peak_bf16_flops == 312e12
  with pytest.raises(ValueError, match="chip 'tpu9'"):
    flops.mfu(1.0, 1.0, 1, "tpu9")
  with pytest.raises(ValueError, match="step_time_s"):
    flops.mfu(1.0, 0.0, 1, "v4")
  chip_of = lambda kind: getattr(chips.of_device_kind(kind), "name", None)  # noqa: E731
  assert chip_of("TPU v5") == "v5p" and chip_of("TPU v5 lite") == "v5e"
  assert chip_of("TPU v6 lite") == "v6e" and chip_of("TPU v4") == "v4"
  assert chip_of("NVIDIA H100 80GB HBM3") == "h100" and chip_of("cpu") is None


def test_traced_counter_follows_scan_and_cond():
  x = sds((8, 16), jnp.float32)
  w = sds((16, 16), jnp.float32)

  def f(x, w):
    y, _ = jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=5)
    return jax.lax.cond(y.sum() > 0, lambda: (y @ w) @ w, lambda: y)

  one = 2 * 8 * 16 * 16
  assert flops.traced_matmul_flops(f, x, w) == 5 * one + 2 * one
  conv = lambda a, k: jax.lax.conv_general_dilated(a, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert flops.traced_matmul_flops(
      conv, sds((2, 6, 6, 3), jnp.float32), sds((3, 3, 3, 4), jnp.float32)
  ) == 2 * 2 * 6 * 6 * 4 * (3 * 3 * 3)


# ---------------------------------------------------------------------------------------------- analytic FLOPs
def _dit_and_args(config, batch=1):
  s = flops.shapes_of(config)
  dit = wan_dit.make_dit(
      config,
      in_channels=s.in_channels,
      out_channels=s.out_channels,
      text_dim=s.text_dim,
      image_dim=s.image_dim if config.model.i2v else None,
  )
  f, h, w, _ = s.latent_shape
  args = (
      sds((batch, f, h, w, s.in_channels), jnp.float32),
      sds((batch,), jnp.float32),
      sds((batch, s.text_len, s.text_dim), jnp.float32),
      sds((batch, s.image_tokens, s.image_dim), jnp.float32) if config.model.i2v else None,
      sds((batch, s.context_tokens, config.model.dim), jnp.float32),
      sds((batch, s.context_tokens, 3), jnp.float32),
      sds((batch, s.context_tokens), jnp.bool_),
  )

  def fwd(p, x, t, text, image, ctx, pos, mask):
    return dit.apply({"params": p}, x, t, text, image, context=ctx, context_pos=pos, context_mask=mask)

  return dit, fwd, args, s


@pytest.mark.parametrize("variant", ["tiny", "wan21_i2v_14b_480p"])
def test_dit_formula_equals_traced_matmuls(variant):
  """The closed form counts exactly the DiT's matmuls (scanned 14B traced abstractly, nothing allocated).

  Model FLOPs are those of exact attention: the ``xla`` backend computes exactly them, while the ``blocked`` kernel
  that ``auto`` picks on CPU pads the keys to whole blocks (implementation work, not model FLOPs)."""
  config = load_config(variant, **{"model.attention": "xla"})
  dit, fwd, args, s = _dit_and_args(config)
  traced = flops.traced_matmul_flops(fwd, wan_dit.abstract_params(dit), *args)
  assert sum(flops.dit_forward_flops(config, s).values()) == traced
  if variant != "tiny":  # the paper setting: 32,760 noise + 1,560 context tokens, 1.81 PFLOP per forward
    assert (s.noise_tokens, s.context_tokens, s.image_tokens) == (32760, 1560, 257)
    assert traced == pytest.approx(1.8104e15, rel=1e-4)


def test_dit_formula_against_xla_cost_analysis():
  """XLA also counts elementwise work (norms, RoPE, softmax, modulation, GELU): analytic = 93-100% of it on the
  unscanned demo DiT (measured 96.7%); matmuls dominate. With exact attention, as above."""
  config = load_config("demo", **{"model.attention": "xla"})
  dit, fwd, args, s = _dit_and_args(config, batch=2)
  compiled = jax.jit(fwd).lower(wan_dit.abstract_params(dit), *args).compile()
  cost = compiled.cost_analysis()
  xla = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
  analytic = 2 * sum(flops.dit_forward_flops(config, s).values())
  assert 0.93 * xla <= analytic <= xla


@pytest.mark.parametrize("variant", ["tiny", "wan21_i2v_14b_480p"])
def test_onestory_module_formulas_equal_traced_matmuls(variant):
  """Frame Selection, the Adaptive Conditioner and the text encoder, against their traced programs."""
  config = load_config(variant)
  system = plan.planning_system(config)
  s = flops.shapes_of(config)
  params = sharding.strip_boxes(jax.eval_shape(system.init_params, jax.random.key(0)))
  f, h, w, c = s.latent_shape
  k = config.selection.k_sel
  apply = lambda method: lambda p, *a: system.model.apply({"params": p}, *a, method=method)  # noqa: E731
  tokens = sds((1, s.text_len), jnp.int32)
  text = sds((1, s.text_len, s.text_dim), jnp.float32)
  assert flops.traced_matmul_flops(apply("encode_text"), params, tokens) == flops.text_encoder_flops(config, s)
  memory = sds((1, s.memory_frames, h, w, c), jnp.float32)
  mmask = sds((1, s.memory_frames), jnp.bool_)
  shot = sds((1, s.memory_frames), jnp.int32)
  assert flops.traced_matmul_flops(
      apply("score_memory"), params, text, sds((1, s.text_len), jnp.bool_), memory, mmask, shot
  ) == flops.frame_selection_flops(config, s)
  frames = sds((1, k, h, w, c), jnp.float32)
  assert flops.traced_matmul_flops(
      apply("build_context"), params, frames, sds((1, k), jnp.bool_), sds((1, k), jnp.float32)
  ) == flops.conditioner_flops(config, s)


def test_step_flops_of_the_paper_setting():
  config = load_config(None)
  sf = flops.step_flops(config)
  b = config.data.batch_size
  dit = sf.entry("dit")
  assert dit.passes == 3 and dit.forward == pytest.approx(b * 1.8104e15, rel=1e-4)
  te = sf.entry("text_encoder")
  assert te.passes == 1 and "frozen" in te.note  # umT5 is in config.optim.frozen
  assert "frozen_backward" not in [e.name for e in sf.entries]  # the trainer does not differentiate umT5
  assert sf.entry("remat_recompute").total == pytest.approx(dit.forward, rel=1e-3)  # remat 'full'
  # Four 81-frame Wan VAE encodes per sample (3 shots + the I2V first-frame video), ~164 TFLOP each.
  assert sf.entry("codec_encode").forward / (4 * b) == pytest.approx(1.64e14, rel=0.02)
  assert sf.entry("image_encoder").forward > 0 and sf.entry("codec_decode").forward > 0
  assert sf.model_flops == pytest.approx(sum(e.total for e in sf.entries if e.in_mfu))
  assert sf.executed_flops > sf.model_flops > sf.dit_flops
  assert 0.85 < sf.dit_flops / sf.model_flops < 0.95
  for policy, expected in [("none", 0.0), ("dots", None)]:
    other = flops.step_flops(load_config(None, **{"model.remat": policy}))
    assert other.model_flops == sf.model_flops  # remat never enters MFU
    if expected is not None:
      assert other.entry("remat_recompute").total == expected
    else:  # the attention score / value matmuls of self, text and image attention
      s = other.shapes
      seq = s.noise_tokens + s.context_tokens
      assert other.entry("remat_recompute").total == b * 40 * 4.0 * seq * 5120 * (seq + 512 + 257)


# ---------------------------------------------------------------------------------------------- plan
def test_parse_topology():
  t = plan.parse_topology("v5p:4x4x4")
  assert (t.chip, t.num_chips, t.hbm_bytes) == ("v5p", 64, 95 * 2**30)
  assert plan.parse_topology("v6e:8x8", num_slices=2).num_chips == 128
  assert plan.parse_topology("v5litepod:4x4").name == "v5e:4x4"
  with pytest.raises(ValueError, match="--topology='v5p:4x4'"):
    plan.parse_topology("v5p:4x4")
  with pytest.raises(ValueError, match="--topology='h100:8'"):
    plan.parse_topology("h100:8")


def test_plan_builds_the_trainers_state_and_batch():
  """The plan's abstract state is the Trainer's (shapes, dtypes, parameter shardings), AdamW moments are sharded
  like their parameters, and the batch spec is what the data pipeline yields."""
  config = load_config("tiny", **{"mesh.shape": (2, 2, 1, 2)})
  tr = trainer_lib.Trainer(config)
  built = plan.abstract_step(config, jax.devices())
  ours = jax.tree_util.tree_flatten_with_path(built.abstract_state)[0]
  theirs = dict(jax.tree_util.tree_flatten_with_path(tr.program.abstract_state)[0])
  assert len(ours) == len(theirs)
  for path, leaf in ours:
    assert (leaf.shape, leaf.dtype) == (theirs[path].shape, theirs[path].dtype)
  trainer_specs = dict(jax.tree_util.tree_flatten_with_path(tr.program.state_shardings.params)[0])
  for path, leaf in jax.tree_util.tree_flatten_with_path(built.abstract_state.params)[0]:
    assert leaf.sharding.spec == trainer_specs[path].spec
  masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731

  def compare(m, p):
    if masked(m):
      return m
    if m.sharding.spec != p.sharding.spec:
      return "different"
    return "replicated" if p.sharding.spec == jax.sharding.PartitionSpec() else "sharded"

  moments = optax.tree_map_params(
      tr.program.tx,
      compare,
      built.abstract_state.opt_state,
      built.abstract_state.params,
      is_leaf=masked,
      transform_non_params=lambda _: None,
  )
  kinds = [x for x in jax.tree.leaves(moments) if isinstance(x, str)]
  assert kinds and "different" not in kinds and "sharded" in kinds
  # One builder: plan compiles exactly the trainer's program (frozen encoders as sharded arguments in both).
  assert built.lower().as_text() == tr.program.lower().as_text()
  batch = next(iter(tr.dataset()))
  spec = pipeline.batch_spec(config)
  assert set(batch) == set(spec)
  for k, (shape, dtype) in spec.items():
    assert (tuple(batch[k].shape), np.dtype(batch[k].dtype)) == (shape, np.dtype(dtype)), k


def test_quick_plan_end_to_end():
  config = load_config("tiny")
  report = plan.plan(config, "v5p:2x2x1", quick=True, step_time=0.5)
  m, f = report["memory_per_chip"], report["flops"]
  assert report["devices_compiled"] == 4 and report["mesh"]["data"] == 4
  assert report["batch_per_chip"] == config.data.batch_size / 4
  for key in ("argument_bytes", "output_bytes", "temporary_bytes", "total_bytes", "state_bytes", "batch_bytes"):
    assert m[key] > 0, key
  assert m["total_bytes"] == (
      m["argument_bytes"] + m["output_bytes"] - m["alias_bytes"] + m["temporary_bytes"] + m["generated_code_bytes"]
  )
  assert m["fits"] and m["alias_bytes"] > 0  # the donated state is aliased with the new state
  assert 0 < m["xla_peak_bytes"] <= m["total_bytes"]
  # The CPU compiler's own peak leaves the temporaries out; the reported peak holds them and the arguments.
  assert m["peak_bytes"] >= m["argument_bytes"] + m["temporary_bytes"] > m["temporary_bytes"]
  sf = flops.step_flops(config)
  assert f["model_flops_per_step"] == sf.model_flops
  assert report["mfu"] == pytest.approx(sf.model_flops / (0.5 * 4 * 459e12))
  assert f["step_time_at_100pct_mfu_s"] == pytest.approx(sf.model_flops / (4 * 459e12))
  text = plan.format_report(report)
  for needle in ("argument", "temporary", "total", "peak", "HBM", "model FLOPs", "MFU", "CPU compiler"):
    assert needle in text, needle


def test_out_of_memory_message_is_read():
  msg = (
      "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (437.18G) "
      "exceeds available HBM (95.74G)."
  )
  out = plan._out_of_memory(msg, 10 * 2**30)  # pylint: disable=protected-access
  assert not out["fits"] and out["temporary_bytes"] == int(437.18 * 2**30)
  assert out["total_bytes"] == 10 * 2**30 + int(437.18 * 2**30)
  assert out["compiler_hbm_bytes"] == int(95.74 * 2**30)
  # What plan prints for it: the total against the HBM, no peak (there is no buffer assignment).
  report = {
      "config": "c",
      "topology": "v5p:2x2x1",
      "num_slices": 1,
      "num_chips": 4,
      "chip": "v5p",
      "mode": "tpu (libtpu, deviceless)",
      "mesh": {"fsdp": 4},
      "global_batch": 4,
      "batch_per_chip": 1.0,
      "remat": "full",
      "scan_layers": True,
      "memory_per_chip": out | {"hbm_bytes": int(95.74 * 2**30), "state_bytes": 2**30, "batch_bytes": 0},
      "flops": dict.fromkeys(
          ("model_flops_per_step", "dit_flops_per_step", "executed_flops_per_step", "model_flops_per_chip"), 1.0
      )
      | {"xla_flops_per_chip": 0.0, "step_time_at_100pct_mfu_s": 1.0, "peak_flops_per_chip": 459e12},
      "compile_seconds": {"lower": 1.0, "compile": 1.0},
      "notes": [],
  }
  report["memory_per_chip"]["encoder_bytes"] = 0
  text = plan.format_report(report)
  assert "4.67 times the HBM: DOES NOT FIT" in text and "  peak " not in text
  assert "the compiler refused: RESOURCE_EXHAUSTED" in text


@pytest.mark.libtpu
def test_libtpu_deviceless_compile():
  """Opt-in (needs the 'tpu' extra): the tiny step compiled for a v5e:2x2 slice through libtpu, no TPU attached."""
  config = load_config("tiny")
  report = plan.plan(config, "v5e:2x2", step_time=0.5)
  m = report["memory_per_chip"]
  assert report["mode"].startswith("tpu") and report["devices_compiled"] == 4
  assert m["fits"] and 0 < m["xla_peak_bytes"] <= m["total_bytes"] < 16 * 2**30
  assert m["argument_bytes"] >= m["state_bytes"] > 0
  assert report["flops"]["xla_flops_per_chip"] > 0
  assert math.isclose(report["mfu"], flops.step_flops(config).model_flops / (0.5 * 4 * 197e12))
