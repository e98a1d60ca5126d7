r"""Benchmarks the OneStory train step on this machine.

  python -m onestory_jax.benchmark --config=configs/onestory.py:demo [--steps=20] [--data_batches=200]
      [--config.data.worker_count=N]
  python -m onestory_jax.benchmark --compare=diffusers [--repeats=5] [--sizes=demo,d512]  (see reference_benchmark.py)

Prints (as JSON) the compiled train step's time, DiT tokens per second (noise + context tokens), the FLOPs of
one step from XLA's cost analysis, the achieved FLOP/s, and this machine's measured matmul FLOP/s
(:func:`onestory_jax.flops.matmul_flops_per_sec`: 2048^3 on CPU, 8192^3 on an accelerator, in the model's compute
dtype, best of several runs), so the step's efficiency can be read against what the hardware does.

It also prints the analytic model FLOPs of one step (:mod:`onestory_jax.flops`: trainable modules forward +
backward, frozen ones forward, no rematerialisation) and the MFU they give against the measured matmul peak of all
devices (``mfu_vs_matmul``; on CPU the simulated devices share the host's cores, so the peak is counted once), and,
on a chip of :mod:`onestory_jax.chips`, against its spec-sheet bf16 peak (``mfu``).

With ``--data_batches=N`` it also times the input pipeline alone (grain, with ``config.data.worker_count`` worker
processes; N batches after a warm-up of the same number) and prints its batches per second against the steps per
second of the train step (``data_over_step``: how many times faster the data comes than the step consumes it).
"""

from __future__ import annotations

import json
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from onestory_jax import chips
from onestory_jax import flops as flops_lib
from onestory_jax import logs
from onestory_jax import reference_benchmark
from onestory_jax import trainer as trainer_lib

# allow_override: plan, train and data.build define --config too; a test process may import several of them.
_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/onestory.py:demo", "Configuration.", lock_config=True, allow_override=True
)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps (after one warm-up step).")
_DATA_BATCHES = flags.DEFINE_integer("data_batches", 0, "Also time the input pipeline over this many batches.")
_COMPARE = flags.DEFINE_enum(
    "compare", None, ["diffusers"], "Instead: the Wan DiT against diffusers' (onestory_jax/reference_benchmark.py)."
)


def benchmark_input_pipeline(tr: trainer_lib.Trainer, batches: int) -> dict:
  """Batches per second that the trainer's input pipeline delivers, alone (after as many warm-up batches)."""
  it = iter(tr.dataset())
  try:
    for _ in range(batches):  # worker start-up and the first stories
      next(it)
    t = time.perf_counter()
    for _ in range(batches):
      jax.block_until_ready(next(it))
    seconds = time.perf_counter() - t
  finally:
    close = getattr(it, "close", None)  # grain's prefetch iterators hold worker processes
    if close is not None:
      close()
  return {"data_worker_count": int(tr.config.data.worker_count), "data_batches_per_s": batches / seconds}


def benchmark_train_step(config, steps: int, data_batches: int = 0) -> dict:
  """Times the trainer's compiled step (:func:`trainer.build_train_program`) on this machine's devices, and with
  ``data_batches`` its input pipeline."""
  tr = trainer_lib.Trainer(config)
  state = tr.init_state()
  it = iter(tr.dataset())
  batches = [next(it) for _ in range(min(steps, 4) + 1)]
  cost = tr.program.lower().compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0))
  state, m = tr.step(state, batches[0])
  jax.block_until_ready(m)
  times = []
  for i in range(steps):
    t = time.perf_counter()
    state, m = tr.step(state, batches[1 + i % (len(batches) - 1)])
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  step_time = float(np.median(times))
  f, h, w, _ = tr.system.latent_shape
  p = config.model.patch_size
  noise_tokens = (f // p[0]) * (h // p[1]) * (w // p[2])
  ctx_tokens = tr.system.model.budget
  tokens = config.data.batch_size * (noise_tokens + ctx_tokens)
  return {
      "config": config.variant,
      "devices": jax.device_count(),
      "global_batch": config.data.batch_size,
      "noise_tokens_per_shot": noise_tokens,
      "context_tokens_per_shot": ctx_tokens,
      "step_time_s": step_time,
      "steps_per_s": 1.0 / step_time,
      "tokens_per_s": tokens / step_time,
      "step_flops": flops,
      "achieved_flops_per_s": flops / step_time,
  } | (_with_ratio(benchmark_input_pipeline(tr, data_batches), step_time) if data_batches else {})


def _with_ratio(data: dict, step_time: float) -> dict:
  return data | {"data_over_step": data["data_batches_per_s"] * step_time}


def analytic_mfu(config, step_time: float, matmul_peak: float) -> dict:
  """Analytic FLOPs of one step and the MFU they mean, against the measured and (if known) the spec peak."""
  sf = flops_lib.step_flops(config)
  dev = jax.devices()[0]
  n = jax.device_count()
  # Simulated CPU devices share the host's cores: the one-device matmul measurement is already the whole host.
  devices_peak = matmul_peak * (1 if dev.platform == "cpu" else n)
  out = {
      "analytic_step_flops": sf.model_flops,
      "analytic_dit_flops": sf.dit_flops,
      "analytic_flops_per_s": sf.model_flops / step_time,
      "mfu_vs_matmul": sf.model_flops / (step_time * devices_peak),
  }
  chip = chips.of_device_kind(dev.device_kind)
  if chip is not None:
    out["chip"] = chip.name
    out["mfu"] = flops_lib.mfu(sf.model_flops, step_time, n, chip.name)
  return out


def main(argv):
  del argv
  if _COMPARE.value == "diffusers":
    reference_benchmark.main()
    return
  config = _CONFIG.value
  out = benchmark_train_step(config, _STEPS.value, _DATA_BATCHES.value)
  dtype = jnp.dtype(config.model.dtype)
  peak = flops_lib.matmul_flops_per_sec(dtype=dtype)
  out["matmul_dtype"] = dtype.name
  out["matmul_flops_per_s"] = peak
  out["fraction_of_matmul"] = out["achieved_flops_per_s"] / peak
  out.update(analytic_mfu(config, out["step_time_s"], peak))
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  logs.run(main)
