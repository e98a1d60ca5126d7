"""python -m onestory_jax.step_profile: the parsing of HLO text and trace events, and a traced step of the tiny
config whose time is charged to the model's parts."""

import jax
import jax.numpy as jnp
import pytest

from onestory_jax import step_profile
from tests.helpers import load_config


def test_hlo_ops_names_matmul_fusions_and_keeps_source_paths():
  def f(a, b):
    return jnp.tanh(a @ b).sum()

  text = jax.jit(jax.grad(f)).lower(jnp.ones((64, 32)), jnp.ones((32, 16))).compile().as_text()
  ops = step_profile.hlo_ops(text)
  kinds = {k for k, _ in ops.values()}
  assert "matmul" in kinds and "other" in kinds
  # The forward's and the backward's dots both keep their source path.
  paths = [p for k, p in ops.values() if k == "matmul"]
  assert any("transpose(jvp(" in p for p in paths) and any("transpose(" not in p and "jvp(" in p for p in paths)


def test_self_times_subtract_nested_events_per_thread():
  ev = lambda name, ts, dur, tid=1: {"ph": "X", "ts": ts, "dur": dur, "tid": tid, "pid": 0, "args": {"hlo_op": name}}
  events = [
      ev("while.1", 0, 100),
      ev("fusion.a", 10, 30),
      ev("fusion.b", 50, 20),
      ev("fusion.a", 120, 5),
      ev("fusion.c", 10, 40, tid=2),  # another thread: not inside the loop
      {"ph": "X", "ts": 0, "dur": 500, "tid": 1, "pid": 0, "name": "python"},  # not an XLA operation
  ]
  assert step_profile.self_times(events) == {"while.1": 50.0, "fusion.a": 35.0, "fusion.b": 20.0, "fusion.c": 40.0}


@pytest.mark.parametrize(
    "path,part",
    [
        (
            "jit(train_step)/jvp(OneStory.velocity)/dit/blocks_3/attn1/while/body/closed_call/dot_general",
            "DiT self-attention",
        ),
        ("jit(train_step)/transpose(jvp(OneStory.velocity))/dit/blocks_0/attn2/dot_general", "DiT cross-attention"),
        ("jit(train_step)/jvp(OneStory.velocity)/dit/blocks_1/ffn/net_0/proj/dot_general", "DiT FFN"),
        (
            "jit(train_step)/jvp(OneStory.velocity)/dit/blocks_1/norm3/mul",
            "DiT blocks, the rest (norms, modulation, residuals)",
        ),
        (
            "jit(train_step)/jvp(OneStory.velocity)/dit/condition_embedder/add",
            "DiT outside the blocks (embeddings, RoPE, head)",
        ),
        ("jit(train_step)/jvp(OneStory.score_memory)/frame_selection/phi_v/conv", "Frame Selection"),
        ("jit(train_step)/sqrt", step_profile.OTHER),
    ],
)
def test_parts_follow_the_module_paths(path, part):
  assert step_profile.part_of(path) == part


def test_a_traced_step_of_the_tiny_config_is_charged_to_its_parts():
  out = step_profile.breakdown(load_config("tiny", **{"model.num_layers": 1, "data.batch_size": 8}), steps=1)
  parts = out["parts"]
  for part in ("DiT self-attention", "DiT cross-attention", "DiT FFN", "Frame Selection", step_profile.OTHER):
    assert part in parts, sorted(parts)
  for part in ("DiT self-attention", "DiT FFN"):
    assert parts[part]["forward"] > 0 and parts[part]["backward"] > 0 and parts[part]["matmul"] > 0
  assert sum(p["share"] for p in parts.values()) == pytest.approx(1.0, abs=1e-3)
  # Each kind is rounded to the microsecond, so their sum may differ from the total by half of one per kind.
  assert out["traced_ops_ms"] == pytest.approx(sum(out["kinds"].values()), abs=5e-4 * len(out["kinds"]) + 1e-9)
  assert out["step_time_ms"] > 0 and out["top"] and out["top"][0]["ms"] >= out["top"][-1]["ms"]
  # Almost every executed operation is found in the compiled HLO (the trainer's step is that program).
  assert out["ops_not_in_hlo"] <= 0.02 * len(out["top"]), out["ops_not_in_hlo"]
  assert "| DiT FFN |" in step_profile.render(out, 5)
