"""``python -m onestory_jax.benchmark --compare=diffusers`` (onestory_jax/reference_benchmark.py) on a tiny size.

One run through the entry point's ``main`` (1 layer, 2 heads x 16, 16 tokens, one timed round): every field of the
JSON record, parity with diffusers within 1e-5 relative in float32, positive times, the table on stderr. Real
torch.compile takes about a minute on this CPU, so here it is replaced by a module that outlasts a 1 s budget: that
checks that a torch.compile which fails or runs too long is reported as unavailable while the rest goes on.
"""

import io
import json
import sys
import time

from absl.testing import flagsaver
import pytest
import torch

from onestory_jax import benchmark
from onestory_jax import reference_benchmark as rb

TIMED = ("torch_eager", "flax")
TIME_FIELDS = ("fwd_s", "fwd_bwd_s", "fwd_min_s", "fwd_bwd_min_s")
RATE_FIELDS = ("fwd_flops_per_s", "fwd_bwd_flops_per_s", "fwd_fraction_of_matmul", "fwd_bwd_fraction_of_matmul")


def _never_finishes(module, *args, **kwargs):
  """A stand-in for torch.compile whose compiled module takes longer than any budget of these tests."""
  del args, kwargs

  def call(*a, **kw):
    time.sleep(60)
    return module(*a, **kw)

  return call


@pytest.fixture(scope="module")
def tiny_run():
  mp = pytest.MonkeyPatch()
  mp.setattr(torch, "compile", _never_finishes)
  stdout, stderr = io.StringIO(), io.StringIO()
  mp.setattr(sys, "stdout", stdout)
  mp.setattr(sys, "stderr", stderr)
  try:
    with flagsaver.flagsaver(
        compare="diffusers", sizes=["tiny"], repeats=1, torch_compile=True, torch_compile_timeout_s=1
    ):
      start = time.perf_counter()
      benchmark.main([])
      seconds = time.perf_counter() - start
  finally:
    mp.undo()
  return json.loads(stdout.getvalue()), stderr.getvalue(), seconds


def test_record_has_every_field(tiny_run):
  out, _, _ = tiny_run
  for key in ("loadavg_before", "loadavg_after", "matmul_flops_per_s", "torch_threads", "repeats", "results"):
    assert key in out, key
  assert len(out["loadavg_before"]) == 3 and out["repeats"] == 1 and out["matmul_flops_per_s"] > 0
  r = out["results"]["tiny"]
  assert r["size"]["tokens"] == 16 and r["size"]["dim"] == 32 and r["size"]["layers"] == 1
  for impl in TIMED:
    for key in TIME_FIELDS + RATE_FIELDS:
      assert r[impl][key] > 0, (impl, key)
  assert r["flax"]["attention_backend"] == "blocked"  # the project's 'auto' on CPU
  assert r["flax"]["compile_s"]["fwd"] > 0 and r["flax"]["compile_s"]["fwd_bwd"] > 0
  for k in ("fwd", "fwd_bwd"):
    ratio = r["flax_over_torch_eager"][k]
    assert ratio == pytest.approx(r["flax"][f"{k}_s"] / r["torch_eager"][f"{k}_s"])
  assert r["flops"]["fwd"] > 0 and r["flops"]["fwd_bwd"] == 3 * r["flops"]["fwd"]
  assert r["flops"]["source"].startswith("analytic")
  assert len(r["loadavg_before"]) == 3 and len(r["loadavg_after"]) == 3


def test_parity_with_diffusers(tiny_run):
  p = tiny_run[0]["results"]["tiny"]["parity"]
  assert p["rel_err"] <= 1e-5 and p["max_abs_err"] <= 1e-5 * p["ref_max_abs"]
  assert p["ref_max_abs"] > 0.1  # not a comparison of zeros
  assert p["loss_rel_err"] <= 1e-5
  # Gradients of every parameter, each against its own largest entry; the timestep MLP's input features reach t
  # radians, so one float32 ulp of a frequency is ~1e-5 of them at t ~ 1000.
  assert p["grad_rel_err"] <= 1e-4, p


def test_torch_compile_over_budget_is_unavailable(tiny_run):
  out, _, seconds = tiny_run
  r = out["results"]["tiny"]
  assert r["torch_compile"]["status"] == "unavailable"
  assert r["torch_compile"]["reason"].startswith("TimeoutError: torch.compile took longer than 1 s")
  assert "\n" not in r["torch_compile"]["reason"]
  assert r["flax_over_torch_compile"] is None
  assert seconds < 55  # the budget cut the 60 s stand-in short


def test_table_on_stderr(tiny_run):
  _, err, _ = tiny_run
  assert "torch_eager" in err and "flax" in err and "unavailable: TimeoutError" in err
  assert "parity rel" in err and "load " in err


def test_errors_are_one_line_value_errors(monkeypatch):
  with pytest.raises(ValueError, match="--sizes: unknown"):
    rb.check_sizes(["nope"])
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
  with pytest.raises(ValueError, match=r"pip install -e '\.\[test\]'"):
    rb.import_reference()


def test_bfloat16_both_sides():
  """--compare_dtype=bfloat16: parameters, inputs and compute in bfloat16 on both sides (on a GPU, the run the README
  quotes); parity at bfloat16's rounding, not float32's."""
  r = rb.compare_size(rb.SIZES["tiny"], 1, 1e9, torch_compile=False, dtype="bfloat16")
  assert r["size"]["dtype"] == "bfloat16"
  p = r["parity"]
  assert 1e-5 < p["rel_err"] <= 3e-2 and p["loss_rel_err"] <= 1e-2, p  # bfloat16 rounding shows, and stays small
  assert p["ref_max_abs"] > 0.1
  with pytest.raises(ValueError, match="--compare_dtype"):
    rb.compare_size(rb.SIZES["tiny"], 1, 1e9, torch_compile=False, dtype="float16")
