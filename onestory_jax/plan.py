r"""Plans a training run without hardware: per-chip memory, FLOPs and MFU of the real train step on a TPU topology.

  python -m onestory_jax.plan --config=configs/onestory.py --topology=v5p:2x2x2 \
      --config.mesh.shape='(1,2,1,4)' --config.data.batch_size=2 [--config.model.remat=full] [--step_time=10] [--json]
  python -m onestory_jax.plan --config=configs/onestory.py:tiny --topology=v6e:2x2 --quick

docs/planning.md has the measured fits of the paper setting and how to read the output.

The trainer's program (:func:`onestory_jax.trainer.build_train_program`: the same state, batch and frozen-encoder
shardings and the same jitted step) is compiled ahead of time for the topology's chips through libtpu (``pip install
'onestory_jax[tpu]'``, i.e. ``jax[tpu]==0.10.2``) with no TPU attached: the chips come from
``jax.experimental.topologies.get_topology_desc`` and everything else runs on the CPU backend. Nothing is
allocated: the train state, the batch and the frozen encoders' parameters are abstract (``jax.ShapeDtypeStruct``
with their shardings), so the 14B paper setting plans on a workstation: 8-19 minutes and 12-17 GiB of host RAM per
compile on 2 busy cores (the step includes four 81-frame Wan VAE encodes, CLIP and umT5 besides the DiT); a layout
that does not fit is refused by the compiler within a minute or two.

Printed per chip: the compiled program's argument, output, temporary and total memory (total = argument + output -
aliased (the donated state) + temporary + generated code: everything at once, an upper bound), and the peak of
simultaneously live buffers from XLA's buffer assignment, which is what must fit in the chip's HBM (libtpu itself
refuses to compile a program whose peak exceeds HBM; ``plan`` then reports what the compiler says it needed), the
state / batch / encoder bytes behind the arguments, the analytic FLOPs per step (:mod:`onestory_jax.flops`), the
step time at 100% MFU and, with ``--step_time``, the MFU that step time would mean.

The mesh is ``config.mesh`` sized to the topology's chips (one entry may be -1). The per-chip batch, remat policy
and layer scanning are config fields: ``--config.data.batch_size`` (global; or ``--batch_per_chip`` to set it to
that many samples per chip), ``--config.model.remat=none|full|dots``, ``--config.model.scan_layers``.

``--quick`` compiles the same step on a simulated CPU mesh (one CPU device per chip, at most
:data:`QUICK_MAX_DEVICES`) for users without libtpu. Its memory figures are the CPU compiler's: buffer assignment,
fusion and rematerialisation differ from TPU's, so they only show the order of magnitude and the sharding. Its peak
is arguments + temporaries + the outputs that reuse no donated argument: the CPU runtime holds a program's
temporaries as one block for the whole run, and the CPU compiler's own peak figure leaves them out.

Without a tokenizer (no ``config.pretrained`` / ``config.text_encoder.tokenizer``) a placeholder stands in for
umT5's, which only the data pipeline uses (the embedding has ``config.text_encoder.vocab_size`` rows either way).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from typing import Any

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags

from onestory_jax import chips
from onestory_jax import flops as flops_lib
from onestory_jax import logs
from onestory_jax import next_shot
from onestory_jax import sharding
from onestory_jax import trainer as trainer_lib
from onestory_jax.data import tokenizer as tokenizer_lib

GIB = 1024**3
QUICK_MAX_DEVICES = 64


# ---------------------------------------------------------------------------------------------- topology
@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice (or several, over DCN): ``v5p:4x4x4`` -> chip 'v5p', dims (4, 4, 4), 64 chips."""

  name: str  # as libtpu spells it, e.g. 'v5p:4x4x4'
  chip: str  # a TPU of onestory_jax.chips
  dims: tuple[int, ...]
  num_slices: int = 1

  @property
  def chips_per_slice(self) -> int:
    return math.prod(self.dims)

  @property
  def num_chips(self) -> int:
    return self.chips_per_slice * self.num_slices

  @property
  def hbm_bytes(self) -> int:
    return chips.get(self.chip).hbm_gib * GIB


def parse_topology(name: str, num_slices: int = 1) -> Topology:
  """Parses ``<generation>:<AxBxC>`` (v4, v5p: 3 dims; v5e / v5litepod, v6e: 2 dims)."""
  generations = sorted(g for c in chips.TPUS for g in c.topology_names)
  m = re.fullmatch(rf"({'|'.join(generations)}):(\d+(?:x\d+){{1,2}})", str(name).strip().lower())
  if not m:
    raise ValueError(
        f"--topology={name!r}: expected <generation>:<dims> with generation one of "
        f"{generations}, e.g. v5p:4x4x4 or v6e:8x8"
    )
  chip = chips.of_topology_name(m.group(1))
  dims = tuple(int(d) for d in m.group(2).split("x"))
  if len(dims) != chip.topology_dims or min(dims) < 1:
    raise ValueError(
        f"--topology={name!r}: {chip.name} slices have {chip.topology_dims} positive dimensions, got " f"{m.group(2)}"
    )
  if int(num_slices) < 1:
    raise ValueError(f"--num_slices={num_slices}: expected >= 1")
  return Topology(name=f"{chip.topology_names[0]}:{m.group(2)}", chip=chip.name, dims=dims, num_slices=int(num_slices))


def tpu_devices(topo: Topology) -> list[Any]:
  """The compile-only TPU devices of ``topo`` (needs libtpu; no TPU and no TPU backend)."""
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", chips.get(topo.chip).accelerator_type(topo.chips_per_slice))
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # A deviceless compile never opens a TPU, so it need not take libtpu's one-process lock (/tmp/libtpu_lockfile),
  # which any other jax process on the machine that loaded libtpu would otherwise hold.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  kwargs = {"chip_config_name": "megacore"} if topo.chip == "v4" else {}
  if topo.num_slices > 1:
    kwargs["num_slices"] = topo.num_slices
  try:
    desc = topologies.get_topology_desc(topology_name=topo.name, platform="tpu", **kwargs)
  except Exception as e:  # libtpu missing or a topology it rejects; jax raises several types here
    raise ValueError(
        f"--topology={topo.name}: libtpu could not describe it ({type(e).__name__}: {e}). Install the "
        "TPU compiler with pip install 'jax[tpu]==0.10.2' (the 'tpu' extra), or use --quick"
    ) from e
  devices = list(desc.devices)
  if len(devices) != topo.num_chips:
    raise ValueError(f"--topology={topo.name}: libtpu gave {len(devices)} devices for {topo.num_chips} chips")
  return devices


# ---------------------------------------------------------------------------------------------- the step
def planning_system(config: ml_collections.ConfigDict) -> next_shot.System:
  """``next_shot.make_system``, with a placeholder tokenizer when umT5's is not configured.

  The tokenizer is only used by the data pipeline; umT5's embedding size comes from
  ``config.text_encoder.vocab_size``, so the compiled step is the same.
  """
  te = config.text_encoder
  if te.name != "umt5" or te.tokenizer or config.pretrained:
    return next_shot.make_system(config)
  placeholder = tokenizer_lib.CaptionTokenizer.from_vocabulary(["placeholder"], int(config.data.text_len))
  return next_shot.make_system(config, tokenizer=placeholder)


def abstract_step(config: ml_collections.ConfigDict, devices: list[Any]) -> trainer_lib.TrainProgram:
  """The trainer's program (:func:`trainer.build_train_program`) over ``devices``, nothing allocated."""
  return trainer_lib.build_train_program(config, planning_system(config), sharding.make_mesh(config, devices))


def _bytes_per_device(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = list(leaf.shape)
    if isinstance(leaf.sharding, jax.sharding.NamedSharding):  # uneven shards are padded: round up
      mesh = leaf.sharding.mesh.shape
      for i, axes in enumerate(leaf.sharding.spec):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        shape[i] = -(-shape[i] // math.prod(mesh[a] for a in axes))
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
  return total


def _key_bytes_fix(tree: Any) -> Any:
  """Typed PRNG keys report an opaque dtype; count them as their uint32 data."""

  def fix(leaf):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      return jax.ShapeDtypeStruct(leaf.shape + (2,), jnp.uint32, sharding=None)
    return leaf

  return jax.tree.map(fix, tree)


# ---------------------------------------------------------------------------------------------- planning
def plan(
    config: ml_collections.ConfigDict,
    topology: str,
    *,
    num_slices: int = 1,
    quick: bool = False,
    step_time: float | None = None,
    devices: list[Any] | None = None,
) -> dict:
  """Compiles the training step of ``config`` for ``topology`` and reports per-chip memory, FLOPs and MFU.

  Args:
    config: the run config (mesh, batch, remat and scan settings are read from it).
    topology: e.g. 'v5p:4x4x4', 'v6e:8x8'.
    num_slices: slices of that topology joined over DCN.
    quick: compile on CPU devices instead of the TPU topology (memory figures are then CPU figures).
    step_time: optional seconds per step; the report then holds the MFU it would mean.
    devices: quick mode only: the CPU devices to use (default: ``jax.devices('cpu')``, at most one per chip).

  Returns:
    A JSON-serialisable dict (see :func:`format_report` for the fields).
  """
  topo = parse_topology(topology, num_slices)
  config = ml_collections.ConfigDict(config.to_dict())  # private, unlocked copy
  full_batch = int(config.data.batch_size)  # the run's; quick mode may compile a proportionally smaller one
  notes = []
  if quick:
    cpus = list(devices if devices is not None else jax.devices("cpu"))
    n = min(topo.num_chips, len(cpus), QUICK_MAX_DEVICES)
    devices = cpus[:n]
    if n < topo.num_chips:
      gb = int(config.data.batch_size)
      if (gb * n) % topo.num_chips:
        raise ValueError(
            f"--quick simulates {n} of {topo.num_chips} chips and scales config.data.batch_size={gb} "
            f"by {n}/{topo.num_chips} to keep the per-chip batch; that is not an integer"
        )
      config.data.batch_size = gb * n // topo.num_chips
      notes.append(
          f"quick mode simulates {n} of the {topo.num_chips} chips; global batch scaled to "
          f"{config.data.batch_size} to keep the per-chip batch"
      )
    notes.append("quick mode: memory figures are the CPU compiler's, not TPU HBM figures")
  else:
    devices = tpu_devices(topo)
  t0 = time.perf_counter()
  logging.info(
      "Tracing the train step of %s for %s (%d devices)", config.get("variant", "the config"), topology, len(devices)
  )
  built = abstract_step(config, devices)
  lowered = built.lower()
  t1 = time.perf_counter()
  logging.info("Traced in %.0f s; compiling it (minutes for the 14B configs)", t1 - t0)
  state_b = _bytes_per_device(_key_bytes_fix(built.abstract_state))
  batch_b, enc_b = _bytes_per_device(built.abstract_batch), _bytes_per_device(built.abstract_encoders)
  hbm = topo.hbm_bytes
  memory = {"hbm_bytes": hbm, "state_bytes": state_b, "batch_bytes": batch_b, "encoder_bytes": enc_b}
  cost = {}
  try:
    compiled = lowered.compile()
  except Exception as e:  # jax.errors.JaxRuntimeError; libtpu refuses programs that exceed HBM
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    memory.update(_out_of_memory(str(e), state_b + batch_b + enc_b))
  else:
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    arg, out = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    alias, temp = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
    code = int(mem.generated_code_size_in_bytes)
    total = arg + out - alias + temp + code
    xla_peak = int(getattr(mem, "peak_memory_in_bytes", 0) or 0)
    if quick:
      # The CPU runtime allocates a program's temporaries as one block for the whole run, and its reported peak
      # leaves them out (it equals the arguments): every argument, the temporaries and the outputs that do not
      # reuse a donated argument are live at once.
      peak = max(xla_peak, arg + out - alias + temp)
    else:
      # libtpu's peak of simultaneously live buffers decides (it reuses dead argument buffers for temporaries);
      # the total, every buffer at once, is an upper bound.
      peak = xla_peak or total
    memory.update(
        {
            "argument_bytes": arg,
            "output_bytes": out,
            "alias_bytes": alias,
            "temporary_bytes": temp,
            "generated_code_bytes": code,
            "total_bytes": total,
            "xla_peak_bytes": xla_peak,
            "peak_bytes": peak,
            "fits": peak <= hbm,
            "compiler_error": "",
        }
    )
  t2 = time.perf_counter()
  n_dev = len(devices)
  full = ml_collections.ConfigDict(config.to_dict())
  full.data.batch_size = full_batch
  sf = flops_lib.step_flops(full)
  peak_flops = chips.get(topo.chip).peak_bf16_flops
  report = {
      "config": config.variant,
      "topology": topo.name,
      "num_slices": topo.num_slices,
      "chip": topo.chip,
      "num_chips": topo.num_chips,
      "devices_compiled": n_dev,
      "mode": "quick (CPU)" if quick else "tpu (libtpu, deviceless)",
      "mesh": {k: int(v) for k, v in built.mesh.shape.items()},
      "global_batch": full_batch,
      "batch_per_chip": full_batch / topo.num_chips,
      "remat": config.model.remat,
      "scan_layers": bool(config.model.scan_layers),
      "memory_per_chip": memory,
      "flops": {
          "model_flops_per_step": sf.model_flops,
          "dit_flops_per_step": sf.dit_flops,
          "executed_flops_per_step": sf.executed_flops,
          "model_flops_per_chip": sf.model_flops / topo.num_chips,
          "xla_flops_per_chip": float(cost.get("flops", 0.0)),
          "peak_flops_per_chip": peak_flops,
          "step_time_at_100pct_mfu_s": sf.model_flops / (topo.num_chips * peak_flops),
          "entries": {e.name: e.total for e in sf.entries},
      },
      "compile_seconds": {"lower": t1 - t0, "compile": t2 - t1},
      "notes": notes,
  }
  if step_time is not None:
    report["step_time_s"] = float(step_time)
    report["mfu"] = flops_lib.mfu(sf.model_flops, step_time, topo.num_chips, topo.chip)
    report["mfu_dit_only"] = flops_lib.mfu(sf.dit_flops, step_time, topo.num_chips, topo.chip)
  return report


_OOM = re.compile(
    r"required for (?P<what>[^(]*?)\s*\((?P<need>[\d.]+)(?P<u1>[KMGT]?)\)\s*exceeds available HBM "
    r"\((?P<have>[\d.]+)(?P<u2>[KMGT]?)\)"
)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _out_of_memory(message: str, argument_bytes: int) -> dict:
  """Memory fields from libtpu's refusal to compile a program that exceeds HBM (no memory analysis then).

  The compiler names what it could not place (e.g. "HLO temporaries (437.18G)"); the argument size is computed from
  the abstract arguments' shardings.
  """
  first = message.strip().splitlines()[0] if message.strip() else message
  out = {
      "argument_bytes": argument_bytes,
      "output_bytes": None,
      "alias_bytes": None,
      "temporary_bytes": None,
      "generated_code_bytes": None,
      "total_bytes": None,
      "xla_peak_bytes": 0,
      "peak_bytes": None,
      "fits": False,
      "compiler_error": first,
  }
  m = _OOM.search(message)
  if m:
    need = int(float(m.group("need")) * _UNITS[m.group("u1")])
    if "temporaries" in m.group("what"):
      out["temporary_bytes"] = need
      out["total_bytes"] = argument_bytes + need
    else:
      out["total_bytes"] = need
    out["compiler_hbm_bytes"] = int(float(m.group("have")) * _UNITS[m.group("u2")])
  return out


def _gib(b: float) -> str:
  return f"{b / GIB:8.2f} GiB" if b >= GIB / 10 or b == 0 else f"{b / 1024 ** 2:8.2f} MiB"


def format_report(r: dict) -> str:
  """The report as the lines ``plan`` prints."""
  m, f = r["memory_per_chip"], r["flops"]
  g = lambda k: "       n/a" if m.get(k) is None else _gib(m[k])  # noqa: E731
  lines = [
      f"OneStory plan: config {r['config']}, topology {r['topology']}"
      + (f" x {r['num_slices']} slices" if r["num_slices"] > 1 else "")
      + f" ({r['num_chips']} {r['chip']} chips), {r['mode']}",
      f"  mesh {r['mesh']}, global batch {r['global_batch']} ({r['batch_per_chip']:g} per chip), "
      f"remat {r['remat']}, scan_layers {r['scan_layers']}",
      "memory per chip:",
      f"  argument   {g('argument_bytes')}   (state {_gib(m['state_bytes']).strip()}, batch "
      f"{_gib(m['batch_bytes']).strip()}, frozen encoders {_gib(m['encoder_bytes']).strip()})",
      f"  output     {g('output_bytes')}   (aliased with donated arguments: {g('alias_bytes').strip()})",
      f"  temporary  {g('temporary_bytes')}",
      f"  code       {g('generated_code_bytes')}",
  ]
  if m["peak_bytes"] is None:  # the compiler refused the program: no buffer assignment, at best its total
    need = "" if m["total_bytes"] is None else f", {m['total_bytes'] / m['hbm_bytes']:.2f} times the HBM"
    lines.append(f"  total      {g('total_bytes')}   of {_gib(m['hbm_bytes']).strip()} HBM{need}: DOES NOT FIT")
  else:
    lines.append(f"  total      {g('total_bytes')}   (every buffer at once: an upper bound)")
    used = m["peak_bytes"]
    how = (
        " (arguments + temporaries + outputs: the CPU runtime holds temporaries for the whole run)"
        if r["mode"].startswith("quick")
        else " (XLA buffer assignment)"
        if m["xla_peak_bytes"]
        else ""
    )
    lines.append(
        f"  peak       {_gib(used)}   of {_gib(m['hbm_bytes']).strip()} HBM "
        f"({100 * used / m['hbm_bytes']:.1f}%){how}: {'fits' if m['fits'] else 'DOES NOT FIT'}"
    )
  if m.get("compiler_error"):
    lines.append(f"  the compiler refused: {m['compiler_error']}")
  lines += [
      "FLOPs per step (analytic, onestory_jax.flops):",
      f"  model FLOPs {f['model_flops_per_step']:.4g} (DiT fwd+bwd {f['dit_flops_per_step']:.4g}), "
      f"{f['model_flops_per_chip']:.4g} per chip; executed incl. remat {f['executed_flops_per_step']:.4g}",
      (
          f"  XLA cost analysis: {f['xla_flops_per_chip']:.4g} per chip (it counts a scanned layer body once)"
          if f["xla_flops_per_chip"]
          else "  XLA cost analysis: n/a (not compiled)"
      ),
      f"  step time at 100% MFU: {f['step_time_at_100pct_mfu_s']:.4g} s "
      f"(peak {f['peak_flops_per_chip'] / 1e12:.0f} TFLOP/s bf16 per chip)",
  ]
  if "mfu" in r:
    lines.append(
        f"  a {r['step_time_s']:g} s step would be MFU {100 * r['mfu']:.1f}% "
        f"(DiT only: {100 * r['mfu_dit_only']:.1f}%)"
    )
  lines.append(f"compile: lower {r['compile_seconds']['lower']:.1f} s, compile {r['compile_seconds']['compile']:.1f} s")
  lines += [f"note: {n}" for n in r["notes"]]
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- CLI
_CONFIG = config_flags.DEFINE_config_file("config", "configs/onestory.py", "Run configuration.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "v5p:4x4x4", "TPU topology, e.g. v5p:4x4x4, v6e:8x8, v5e:4x4, v4:2x2x2.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices of --topology joined over DCN.")
_BATCH_PER_CHIP = flags.DEFINE_integer(
    "batch_per_chip", None, "If set, config.data.batch_size = batch_per_chip x chips."
)
_STEP_TIME = flags.DEFINE_float("step_time", None, "Seconds per step; prints the MFU it would mean.")
_QUICK = flags.DEFINE_bool("quick", False, "Compile on a simulated CPU mesh (no libtpu; CPU memory figures).")
_JSON = flags.DEFINE_bool("json", False, "Print the report as JSON.")


def main(argv):
  if not os.environ.get("JAX_PLATFORMS"):  # the TPU is only described, never attached
    jax.config.update("jax_platforms", "cpu")
  topo = parse_topology(_TOPOLOGY.value, _NUM_SLICES.value)
  if _QUICK.value and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    jax.config.update("jax_num_cpu_devices", min(topo.num_chips, QUICK_MAX_DEVICES))
  config = _CONFIG.value
  if _BATCH_PER_CHIP.value is not None:
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.batch_size = _BATCH_PER_CHIP.value * topo.num_chips
  report = plan(config, _TOPOLOGY.value, num_slices=_NUM_SLICES.value, quick=_QUICK.value, step_time=_STEP_TIME.value)
  print(json.dumps(report, indent=2) if _JSON.value else format_report(report))


if __name__ == "__main__":
  logs.run(main)
