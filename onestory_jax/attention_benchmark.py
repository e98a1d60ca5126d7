r"""Times the attention backends against PyTorch's fused CPU attention, side by side in one run.

  python -m onestory_jax.attention_benchmark [--tokens=2048 --heads=8 --head_dim=64 --batch=1 --repeats=5]

For each shape (the one given by the flags and, with ``--demo`` (default on), the demo DiT's self-attention:
batch 8, 320 tokens, 4 heads x 32) it times, on identical float32 inputs:

* ``xla``: ``jax.nn.dot_product_attention(implementation='xla')`` (the attention registry's ``'xla'`` backend),
* ``blocked``: :mod:`onestory_jax.models.blocked_attention` (the registry's ``'blocked'`` backend),
* ``torch``: ``torch.nn.functional.scaled_dot_product_attention`` (imported lazily; exits 2 if torch is missing),

forward alone and forward + backward (the vector-Jacobian product with one fixed random output cotangent, giving
dq, dk, dv). The JAX functions are jitted; each is run once to compile and warm up, then ``--repeats`` rounds time
every backend once per round (interleaved, so a change in machine load hits all of them alike) and the median is
reported (the minimum too). It prints JSON: the times, the ratios to torch, and the largest absolute difference of
the outputs and of each gradient from torch's.

Timings are only meaningful on an otherwise idle machine: the JSON records ``os.getloadavg()`` before and after.
``--torch_threads`` sets ``torch.set_num_threads`` (0, the default, leaves torch's own choice, which is reported).
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from onestory_jax import logs
from onestory_jax.models import attention
from onestory_jax.models import blocked_attention

_TOKENS = flags.DEFINE_integer("tokens", 2048, "Sequence length (queries = keys).")
_HEADS = flags.DEFINE_integer("heads", 8, "Attention heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head dimension.")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch size.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds (after one warm-up call per function).")
_DEMO = flags.DEFINE_boolean("demo", True, "Also time the demo DiT's shape (batch 8, 320 tokens, 4 heads x 32).")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads (0 = leave torch's default).")

DEMO_SHAPE = (8, 320, 4, 32)  # batch, tokens, heads, head_dim
BACKENDS = ("xla", "blocked")


def _jax_fns(name: str):
  """(forward, forward+backward) jitted: q, k, v [B, L, H, D] (+ cotangent) -> out / (out, dq, dk, dv)."""

  def fwd(q, k, v):
    return attention.dot_product_attention(q, k, v, backend=name)

  def fwd_bwd(q, k, v, ct):
    out, vjp = jax.vjp(fwd, q, k, v)
    return (out,) + vjp(ct)

  return jax.jit(fwd), jax.jit(fwd_bwd)


def _torch_fns(torch, q, k, v, ct):
  """The same two functions on torch tensors in torch's [B, H, L, D] layout."""
  sdpa = torch.nn.functional.scaled_dot_product_attention
  to_t = lambda a: torch.from_numpy(np.ascontiguousarray(np.swapaxes(np.asarray(a), 1, 2)))
  tq, tk, tv, tct = (to_t(a) for a in (q, k, v, ct))
  for t in (tq, tk, tv):
    t.requires_grad_(True)

  def fwd():
    with torch.no_grad():
      return sdpa(tq, tk, tv)

  def fwd_bwd():
    tq.grad = tk.grad = tv.grad = None
    out = sdpa(tq, tk, tv)
    out.backward(tct)
    return out, tq.grad, tk.grad, tv.grad

  from_t = lambda t: np.swapaxes(t.detach().numpy(), 1, 2)
  return fwd, fwd_bwd, from_t


def _time(fn) -> float:
  t = time.perf_counter()
  out = fn()
  jax.block_until_ready(out)
  return time.perf_counter() - t


def benchmark_shape(torch, batch: int, tokens: int, heads: int, head_dim: int, repeats: int) -> dict:
  """Times xla, blocked and torch on one shape (module docstring); returns the JSON-able record."""
  rng = np.random.default_rng(0)
  q, k, v, ct = (rng.standard_normal((batch, tokens, heads, head_dim)).astype(np.float32) for _ in range(4))
  jq, jk, jv, jct = (jnp.asarray(a) for a in (q, k, v, ct))
  calls = {}
  for name in BACKENDS:
    f, fb = _jax_fns(name)
    calls[name] = (lambda f=f: f(jq, jk, jv), lambda fb=fb: fb(jq, jk, jv, jct))
  t_fwd, t_fb, from_t = _torch_fns(torch, q, k, v, ct)
  calls["torch"] = (t_fwd, t_fb)

  results = {name: (c[0](), c[1]()) for name, c in calls.items()}  # compile + warm up; keep the values
  times = {name: ([], []) for name in calls}
  for _ in range(repeats):
    for name, (f, fb) in calls.items():
      times[name][0].append(_time(f))
      times[name][1].append(_time(fb))

  ref_out, ref_grads = from_t(results["torch"][0]), [from_t(t) for t in results["torch"][1][1:]]
  record = {
      "shape": {"batch": batch, "tokens": tokens, "heads": heads, "head_dim": head_dim, "dtype": "float32"},
  }
  for name in calls:
    fwd_s, fb_s = times[name]
    entry = {
        "fwd_s": float(np.median(fwd_s)),
        "fwd_bwd_s": float(np.median(fb_s)),
        "fwd_min_s": float(np.min(fwd_s)),
        "fwd_bwd_min_s": float(np.min(fb_s)),
    }
    if name != "torch":
      out, grads = results[name][0], results[name][1][1:]
      entry["max_abs_diff_vs_torch"] = {
          "out": float(np.max(np.abs(np.asarray(out) - ref_out))),
          **{f"d{x}": float(np.max(np.abs(np.asarray(g) - r))) for x, g, r in zip("qkv", grads, ref_grads)},
      }
    record[name] = entry
  for name in BACKENDS:
    record[f"{name}_over_torch"] = {
        "fwd": record[name]["fwd_s"] / record["torch"]["fwd_s"],
        "fwd_bwd": record[name]["fwd_bwd_s"] / record["torch"]["fwd_bwd_s"],
    }
  record["blocked_plan"] = blocked_attention.plan(batch * heads, tokens, tokens)._asdict()
  return record


def main(argv):
  del argv
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError("attention_benchmark compares against PyTorch, which is not installed: pip install -e '.[test]'")
  if _TORCH_THREADS.value > 0:
    torch.set_num_threads(_TORCH_THREADS.value)
  out = {
      "platform": jax.default_backend(),
      "devices": jax.device_count(),
      "cpu_count": os.cpu_count(),
      "torch_version": torch.__version__,
      "torch_threads": torch.get_num_threads(),
      "repeats": _REPEATS.value,
      "loadavg_before": os.getloadavg(),
  }
  shapes = [(_BATCH.value, _TOKENS.value, _HEADS.value, _HEAD_DIM.value)]
  if _DEMO.value and DEMO_SHAPE not in shapes:
    shapes.append(DEMO_SHAPE)
  out["results"] = [benchmark_shape(torch, *s, _REPEATS.value) for s in shapes]
  out["loadavg_after"] = os.getloadavg()
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  logs.run(main)
