r"""Where the train step's time goes: a ``jax.profiler`` trace of the compiled step, summed per model part and kind.

  python -m onestory_jax.step_profile --config=configs/onestory.py:demo [--steps=5] [--top=12] [--json]

Runs the trainer's own step (:func:`trainer.build_train_program`, as :mod:`onestory_jax.benchmark` times it) for one
warm-up and ``--steps`` traced steps, reads the trace that ``jax.profiler`` writes (its Perfetto JSON), and charges
each executed XLA operation's self time (nested operations such as a ``while`` loop's body are charged to
themselves, not to the loop) to:

* a **part** of the model, from the operation's source path in the compiled HLO (``op_name`` metadata: Flax module
  names): the DiT's self-attention, cross-attention, FFN and the rest of its blocks (norms, modulation, residuals),
  the DiT outside its blocks, Frame Selection, the Adaptive Conditioner, the text encoder, and the rest (loss,
  noise, optimizer update);
* a **direction**: backward (JAX's ``transpose`` of the forward), or not (the forward, and what is not
  differentiated: noise, loss, optimizer update);
* a **kind**: matmul (a ``dot`` or convolution, fused or not), copy / transpose, or other (elementwise, reductions,
  gathers).

It prints the median step time under the profiler, the traced operations' total, and a table of parts with their
forward / backward milliseconds per step and their share of the total, then the ``--top`` operations. Read the
shares rather than the milliseconds: tracing every operation slows a step of many small ones (the demo step takes
about 1.7 times as long under the profiler), and XLA:CPU runs independent operations concurrently, so the
operations' total can exceed the step's wall time. It says which part of the step a change should target.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from onestory_jax import trainer as trainer_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/onestory.py:demo", "Configuration.", lock_config=True, allow_override=True
)
_STEPS = flags.DEFINE_integer("steps", 5, "Traced steps (after one warm-up step).", allow_override=True)
_TOP = flags.DEFINE_integer("top", 12, "Also print this many of the costliest operations.")
_JSON = flags.DEFINE_bool("json", False, "Print the breakdown as one JSON line instead of tables.", allow_override=True)

# (part, pattern on the op_name path); the first match wins.
PARTS = (
    ("DiT self-attention", r"/dit/blocks_\d+/attn1/"),
    ("DiT cross-attention", r"/dit/blocks_\d+/attn2/"),
    ("DiT FFN", r"/dit/blocks_\d+/ffn/"),
    ("DiT blocks, the rest (norms, modulation, residuals)", r"/dit/blocks_\d+/"),
    ("DiT outside the blocks (embeddings, RoPE, head)", r"/dit/"),
    ("Frame Selection", r"/frame_selection/"),
    ("Adaptive Conditioner", r"/adaptive_conditioner/"),
    ("text encoder", r"/text_encoder/"),
)
OTHER = "the rest (loss, noise, optimizer update)"


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
  """``{instruction name: (opcode kind, op_name)}`` of a compiled module's HLO text. A fusion's kind is that of its
  fused computation: ``matmul`` when it holds a dot or a convolution."""
  computations: dict[str, str] = {}
  current = None
  for line in hlo_text.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if m and not line.startswith(" "):
      current = m.group(1)
      computations[current] = ""
    elif current is not None:
      computations[current] += line + "\n"
  matmul_computations = {c for c, body in computations.items() if re.search(r" (dot|convolution)\(", body)}
  out = {}
  for line in hlo_text.splitlines():
    m = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([a-z][\w\-]*)\(", line)
    if not m:
      continue
    name, opcode = m.groups()
    called = re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", line)
    if opcode in ("dot", "convolution") or (opcode in ("fusion", "call") and set(called) & matmul_computations):
      kind = "matmul"
    elif opcode in ("copy", "transpose") or (opcode == "fusion" and name.startswith(("copy", "transpose"))):
      kind = "copy / transpose"
    else:
      kind = "other"
    op_name = re.search(r'op_name="([^"]*)"', line)
    out[name] = (kind, op_name.group(1) if op_name else "")
  return out


def part_of(op_name: str) -> str:
  for part, pattern in PARTS:
    if re.search(pattern, op_name):
      return part
  return OTHER


def self_times(events: list[dict]) -> dict[str, float]:
  """Microseconds of self time per ``hlo_op`` over complete trace events: an event's duration less that of the
  events nested in it on the same thread (a loop's body, a conditional's branch)."""
  out: dict[str, float] = collections.defaultdict(float)
  by_thread = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "X" and "hlo_op" in (e.get("args") or {}):
      by_thread[(e.get("pid"), e.get("tid"))].append(e)
  for evs in by_thread.values():
    evs.sort(key=lambda e: (float(e["ts"]), -float(e.get("dur", 0))))
    stack: list[tuple[float, str]] = []  # (end, hlo_op) of the enclosing events
    for e in evs:
      start, dur, name = float(e["ts"]), float(e.get("dur", 0)), e["args"]["hlo_op"]
      while stack and stack[-1][0] <= start:
        stack.pop()
      if stack:
        out[stack[-1][1]] -= dur
      out[name] += dur
      stack.append((start + dur, name))
  return dict(out)


def trace_steps(tr: trainer_lib.Trainer, steps: int) -> tuple[list[dict], list[float]]:
  """One warm-up step, then ``steps`` steps under ``jax.profiler``; returns the trace events and the step times."""
  state = tr.init_state()
  it = iter(tr.dataset())
  batches = [next(it) for _ in range(steps + 1)]
  state, m = tr.step(state, batches[0])
  jax.block_until_ready(m)
  times = []
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for b in batches[1:]:
        t = time.perf_counter()
        state, m = tr.step(state, b)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    (path,) = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
      trace = json.load(f)
  return (trace["traceEvents"] if isinstance(trace, dict) else trace), times


def breakdown(config, steps: int) -> dict:
  """The step's time per part, direction and kind (module docstring), in milliseconds per step."""
  tr = trainer_lib.Trainer(config)
  ops = hlo_ops(tr.program.lower().compile().as_text())
  events, times = trace_steps(tr, steps)
  per_op = self_times(events)
  unknown = sorted(name for name in per_op if name not in ops)
  table: dict[str, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
  kinds: dict[str, float] = collections.defaultdict(float)
  top = []
  for name, us in per_op.items():
    kind, op_name = ops.get(name, ("other", ""))
    ms = us / 1e3 / steps
    direction = "backward" if "transpose(" in op_name else "forward"  # or not differentiated
    part = part_of(op_name)
    table[part][direction] += ms
    table[part][kind] += ms
    kinds[kind] += ms
    top.append((ms, name, kind, part, direction))
  total = sum(kinds.values())
  order = [p for p, _ in PARTS] + [OTHER]
  return {
      "config": config.variant,
      "steps": steps,
      "step_time_ms": 1e3 * float(np.median(times)),
      "traced_ops_ms": total,
      "parts": {
          p: {k: round(v, 3) for k, v in table[p].items()}
          | {"share": round(sum(table[p][d] for d in ("forward", "backward")) / total, 4)}
          for p in order
          if p in table
      },
      "kinds": {k: round(v, 3) for k, v in kinds.items()},
      "top": [dict(op=n, ms=round(ms, 3), kind=k, part=p, direction=d) for ms, n, k, p, d in sorted(top, reverse=True)],
      "ops_not_in_hlo": len(unknown),
  }


def render(out: dict, top: int) -> str:
  lines = [
      f"{out['config']}: step {out['step_time_ms']:.1f} ms (median of {out['steps']}), traced operations "
      f"{out['traced_ops_ms']:.1f} ms per step",
      "",
      "| part | forward (or not differentiated) ms | backward ms | matmul ms | copy / transpose ms | other ms | share |",
      "|---|---|---|---|---|---|---|",
  ]
  for part, v in out["parts"].items():
    cells = [v.get(k, 0.0) for k in ("forward", "backward", "matmul", "copy / transpose", "other")]
    lines.append(f"| {part} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {100 * v['share']:.1f}% |")
  k = out["kinds"]
  lines.append(
      f"| all | | | {k.get('matmul', 0):.1f} | {k.get('copy / transpose', 0):.1f} | {k.get('other', 0):.1f} | 100% |"
  )
  lines += ["", "| operation | ms per step | kind | part | direction |", "|---|---|---|---|---|"]
  for t in out["top"][:top]:
    lines.append(f"| {t['op']} | {t['ms']:.2f} | {t['kind']} | {t['part']} | {t['direction']} |")
  return "\n".join(lines)


def main(argv):
  del argv
  out = breakdown(_CONFIG.value, _STEPS.value)
  print(json.dumps(out) if _JSON.value else render(out, _TOP.value), flush=True)


if __name__ == "__main__":
  app.run(main)
