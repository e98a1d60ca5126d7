r"""Converts a diffusers-format Wan release into orbax checkpoints of the Flax ports.

Usage::

    python -m onestory_jax.convert --src=/data/Wan2.1-I2V-14B-480P-Diffusers --dst=/data/wan21_i2v_14b_flax \
        [--components=transformer,vae,text_encoder,image_encoder] [--scan_layers] [--dtype=bfloat16]

A diffusers Wan release keeps every component as safetensors in its own directory: ``transformer/`` and ``vae/``
(``config.json`` plus ``diffusion_pytorch_model.safetensors``, or numbered shards and a
``diffusion_pytorch_model.safetensors.index.json``), ``text_encoder/`` and ``image_encoder/`` (transformers'
``model*.safetensors``), ``tokenizer/`` and ``image_processor/``. Pickled files are never opened.

For every component the converter

1. reads the shard headers and the component's ``config.json``, builds the Flax module's abstract parameter tree
   (``jax.eval_shape`` of its init; nothing is allocated) and checks every published name and shape against it
   through the module's key map (:func:`onestory_jax.weights.plan_conversion`). Missing, unexpected and
   mis-shaped keys are listed on the console and in ``report.json``; a component that does not match is not
   written and the command exits with status 1;
2. streams the tensors one at a time (:func:`onestory_jax.weights.read_tensor`), in file order for ordinary
   parameters. A parameter of scanned layers (``--scan_layers``) is one ``[num_layers, ...]`` array: it is
   preallocated alone and filled layer by layer before the next parameter starts. Converted parameters are handed
   to orbax in batches of at most ``--batch_mb`` (orbax partial saves, finalized once at the end), so the host holds
   at most one batch plus one stacked parameter, never the checkpoint;
3. writes ``DST/<component>/`` (an orbax checkpoint of the module's parameter tree, loadable with
   :func:`onestory_jax.weights.load_converted` straight into a sharded layout), ``DST/<component>.config.json``
   (the source config) and, for the encoders, the tokenizer / image-processor files.

``DST/report.json`` records per component the validation result, tensor counts, source and output bytes, the
dtypes written, and the memory used: ``peak_live_bytes`` (the largest total size of the read and converted arrays
held at once; temporaries inside a transform are not counted), ``rss_at_start_bytes`` (the resident set size when
streaming starts: Python, jax and orbax loaded) and ``peak_rss_bytes`` (the largest resident set size, sampled every
10 ms while streaming); for the whole run ``rss_before_bytes``, ``peak_rss_bytes`` and ``maxrss_bytes`` (the
``getrusage`` high-water mark of the process). The growth follows --batch_mb and, with --scan_layers, the largest
stacked parameter, not the size of the checkpoint (the README has the measured figures).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import functools
import importlib
import json
import os
import resource
import shutil
import sys
import threading
import time
from typing import Any, Callable, Sequence

import ml_dtypes
import numpy as np

from onestory_jax import video_io
from onestory_jax import weights

Tree = Any


# ----------------------------------------------------------------------------- the component registry


@dataclasses.dataclass(frozen=True)
class Component:
  """How one component of a release is converted.

  Attributes:
    name: the component, also the output directory name.
    subdir: its directory in the release.
    stem: the weight file stem (``diffusion_pytorch_model`` for diffusers, ``model`` for transformers).
    key_map: ``(config.json dict, scanned) -> (published name -> Target | None)``.
    abstract_params: ``(config.json dict, scanned) -> abstract parameter tree`` (unboxed ShapeDtypeStructs).
    assets: release directories copied verbatim next to the checkpoint (tokenizer files and the like).
  """

  name: str
  subdir: str
  stem: str
  key_map: Callable[[dict, bool], weights.KeyMap]
  abstract_params: Callable[[dict, bool], Tree]
  assets: tuple[str, ...] = ()


def _transformer_key_map(cfg: dict, scanned: bool) -> weights.KeyMap:
  from onestory_jax.models.wan import dit as wan_dit  # pylint: disable=g-import-not-at-top

  layers = wan_dit.config_from_diffusers(cfg)["num_layers"]
  return functools.partial(wan_dit.torch_key_to_target, num_layers=layers, scanned=scanned)


def _transformer_params(cfg: dict, scanned: bool) -> Tree:
  from onestory_jax.models.wan import dit as wan_dit  # pylint: disable=g-import-not-at-top

  return wan_dit.abstract_params(wan_dit.dit_from_diffusers(cfg, scan_layers=scanned))


def _port(module: str, name: str) -> Callable[..., Any]:
  """``onestory_jax.models.<module>.<name>``, imported when a component is converted."""
  try:
    mod = importlib.import_module(f"onestory_jax.models.{module}")
  except ModuleNotFoundError as e:
    raise ValueError(f"converting needs onestory_jax.models.{module}, which is not importable: {e}") from e
  if not hasattr(mod, name):
    raise ValueError(f"onestory_jax.models.{module} has no {name}(); the converter's registry expects it")
  return getattr(mod, name)


# The VAE and the encoders are ported in their own modules; each exposes its key map and its abstract parameter
# tree built from the release's config.json. These lines are the whole wiring (none of them has scanned layers).
COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in (
        Component("transformer", "transformer", "diffusion_pytorch_model", _transformer_key_map, _transformer_params),
        Component(
            "vae",
            "vae",
            "diffusion_pytorch_model",
            lambda cfg, scanned: _port("wan.vae", "torch_key_to_target"),
            lambda cfg, scanned: _port("wan.vae", "abstract_params_from_diffusers")(cfg),
        ),
        Component(
            "text_encoder",
            "text_encoder",
            "model",
            lambda cfg, scanned: _port("wan.umt5", "umt5_key_map_from_transformers")(cfg),
            lambda cfg, scanned: _port("wan.umt5", "umt5_abstract_params_from_transformers")(cfg),
            assets=("tokenizer",),
        ),
        Component(
            "image_encoder",
            "image_encoder",
            "model",
            lambda cfg, scanned: _port("wan.clip", "torch_key_to_target"),
            lambda cfg, scanned: _port("wan.clip", "abstract_params_from_transformers")(cfg),
            assets=("image_processor",),
        ),
        # Not part of a Wan release: the DINOv2 of the Frame Selection pseudo-labels (paper App. A.2), a transformers
        # save_pretrained folder placed at <src>/dinov2/ (onestory_jax.models.dinov2).
        Component(
            "dinov2",
            "dinov2",
            "model",
            lambda cfg, scanned: _port("dinov2", "torch_key_to_target"),
            lambda cfg, scanned: _port("dinov2", "abstract_params_from_transformers")(cfg),
        ),
    )
}
# Asset files copied from the release: configuration and tokenizer data only (never pickles).
_ASSET_SUFFIXES = (".json", ".txt", ".model")
# --dtype values other than 'stored'.
_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}


# ----------------------------------------------------------------------------- memory accounting


def _rss_bytes() -> int:
  """Current resident set size (Linux /proc; 0 where unavailable)."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, IndexError):
    return 0


def _maxrss_bytes() -> int:
  usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return usage if sys.platform == "darwin" else usage * 1024


def _return_free_memory() -> None:
  """Asks glibc to give freed heap memory back to the system (orbax's writer threads leave it in their arenas)."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


class MemoryMeter:
  """Counts the bytes of converted arrays held at once, and samples the RSS every ``interval`` seconds."""

  def __init__(self, interval: float = 0.01):
    self.live = 0
    self.peak_live = 0
    self.peak_rss = _rss_bytes()
    self._interval = interval
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._sample, daemon=True)

  def _sample(self) -> None:
    while not self._stop.wait(self._interval):
      self.peak_rss = max(self.peak_rss, _rss_bytes())

  def __enter__(self) -> "MemoryMeter":
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()
    self.peak_rss = max(self.peak_rss, _rss_bytes())

  def hold(self, nbytes: int) -> None:
    self.live += int(nbytes)
    self.peak_live = max(self.peak_live, self.live)

  def release(self, nbytes: int) -> None:
    self.live -= int(nbytes)


# ----------------------------------------------------------------------------- streaming


def _out_dtype(stored: np.dtype, dtype: np.dtype | None) -> np.dtype:
  return stored if dtype is None else dtype


def _convert_one(
    info: weights.TensorInfo,
    transform: weights.Transform,
    expected: tuple[int, ...],
    dtype: np.dtype | None,
    dest: str,
    meter: MemoryMeter,
) -> np.ndarray:
  """Reads and converts one tensor; the returned array is counted as held by ``meter``."""
  x = weights.read_tensor(info)
  meter.hold(x.nbytes)
  y = np.ascontiguousarray(transform(x), dtype=_out_dtype(x.dtype, dtype))
  if y is not x:
    meter.hold(y.nbytes)
    meter.release(x.nbytes)
  del x
  if tuple(y.shape) != tuple(expected):
    raise ValueError(
        f"{info.file}: tensor {info.name!r} -> {dest} has shape {list(y.shape)} after its transform; "
        f"the model expects {list(expected)}"
    )
  return y


def _slot_order(slot: weights.Slot) -> tuple[str, int]:
  info = min((s[0] for s in slot.sources.values()), key=lambda i: (i.file, i.offset))
  return info.file, info.offset


def stream_convert(
    plan: weights.ConversionPlan,
    out_path: str,
    *,
    dtype: np.dtype | None = None,
    batch_bytes: int = 512 * 2**20,
    meter: MemoryMeter | None = None,
    log: Callable[[str], None] = print,
) -> dict:
  """Writes the parameters of a valid plan to an orbax checkpoint at ``out_path``, streaming.

  Ordinary parameters are converted in the order in which they lie in the shards; a stacked (scanned) parameter is
  preallocated alone and filled layer by layer. Converted arrays are saved in batches of about ``batch_bytes``
  (orbax partial saves into ``out_path``'s partial-save directory, finalized at the end).

  Returns:
    Statistics: parameters and tensors written, bytes read and written, dtypes written.
  """
  import orbax.checkpoint.experimental.v1 as ocp  # pylint: disable=g-import-not-at-top

  if not plan.ok:
    raise ValueError(f"stream_convert: the plan for {out_path} has validation errors:\n{plan.summary()}")
  meter = meter or MemoryMeter()
  batch: dict[tuple[str, ...], np.ndarray] = {}
  held = 0
  stats = {
      "parameters": 0,
      "tensors": 0,
      "bytes_read": 0,
      "bytes_written": 0,
      "largest_parameter_bytes": 0,
      "batches": 0,
      "dtypes": {},
  }

  # The arrays are never touched again once saved, so orbax need not copy them first; chunks of at most 16 MiB keep
  # its encoding buffers small and let a sharded restore read only the chunks of each device's shard.
  ctx = ocp.Context()
  ctx.memory.deepcopy_host_arrays = False
  ctx.array.saving.storage_options.chunk_byte_size = 16 * 2**20

  def flush():
    nonlocal held, batch
    if batch:
      with ctx:
        ocp.partial.save(out_path, weights.unflatten_tree(batch))
      stats["batches"] += 1
      meter.release(held)
      batch, held = {}, 0
      _return_free_memory()

  slots = sorted(plan.slots.values(), key=_slot_order)
  total = sum(info.nbytes for slot in slots for info, _ in slot.sources.values())
  t0 = time.time()
  for n, slot in enumerate(slots):
    dest = weights.path_str(slot.path)
    if slot.stacked:
      first = slot.sources[0][0]
      value = np.empty(slot.shape, _out_dtype(first.dtype, dtype))
      meter.hold(value.nbytes)
      for layer in range(slot.shape[0]):
        info, transform = slot.sources[layer]
        y = _convert_one(info, transform, slot.item_shape, value.dtype, weights.path_str(slot.path, layer), meter)
        value[layer] = y
        meter.release(y.nbytes)
        stats["tensors"] += 1
        stats["bytes_read"] += info.nbytes
        del y
    else:
      info, transform = slot.sources[None]
      value = _convert_one(info, transform, slot.shape, dtype, dest, meter)
      stats["tensors"] += 1
      stats["bytes_read"] += info.nbytes
    batch[slot.path] = value
    held += value.nbytes
    stats["parameters"] += 1
    stats["bytes_written"] += value.nbytes
    stats["largest_parameter_bytes"] = max(stats["largest_parameter_bytes"], value.nbytes)
    stats["dtypes"][str(value.dtype)] = stats["dtypes"].get(str(value.dtype), 0) + 1
    del value
    if held >= batch_bytes:
      flush()
      done = stats["bytes_read"] / max(1, total)
      elapsed = time.time() - t0
      log(
          f"    {n + 1}/{len(slots)} parameters, {stats['bytes_read'] / 2**20:.1f} MiB read "
          f"({100 * done:.0f}%, {stats['bytes_read'] / 2**20 / max(elapsed, 1e-9):.1f} MiB/s, "
          f"ETA {elapsed * (1 - done) / max(done, 1e-9):.0f} s)"
      )
  flush()
  ocp.partial.finalize(out_path)
  return stats


# ----------------------------------------------------------------------------- one component


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    raise ValueError(f"{path}: missing (every component directory of a diffusers release has a config.json)")
  return video_io.read_json_object(path)


def _remove_tree(path: str) -> None:
  """Removes the directory ``path`` and orbax's partial-save directories of it (``path.partial_save*``)."""
  parent, base = os.path.split(path)
  if not os.path.isdir(parent):
    return
  for entry in os.listdir(parent):
    full = os.path.join(parent, entry)
    if (entry == base or entry.startswith(base + ".partial_save")) and os.path.isdir(full):
      shutil.rmtree(full)


def convert_component(
    src: str,
    dst: str,
    component: str | Component,
    *,
    scanned: bool = False,
    dtype: str | None = None,
    batch_bytes: int = 512 * 2**20,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
  """Validates and converts one component of a release; returns its report entry.

  The entry has ``status``: ``ok`` (written to ``dst/<name>``) or ``invalid`` (validation failed; nothing written),
  the validation lists of :meth:`weights.ConversionPlan.report`, and the statistics of :func:`stream_convert`.

  Raises:
    ValueError: unknown component, unreadable release files, an existing output without ``overwrite``.
  """
  comp = component if isinstance(component, Component) else COMPONENTS.get(component)
  if comp is None:
    raise ValueError(f"--components: unknown component {component!r}; expected some of {sorted(COMPONENTS)}")
  if dtype not in (None, "stored") and dtype not in _DTYPES:
    raise ValueError(f"--dtype: expected 'stored' or one of {sorted(_DTYPES)}; got {dtype!r}")
  out_dtype = None if dtype in (None, "stored") else _DTYPES[dtype]
  comp_dir = os.path.join(src, comp.subdir)
  if not os.path.isdir(comp_dir):
    raise ValueError(f"--src={src}: no {comp.subdir}/ directory for component {comp.name!r}")
  out_path = weights.converted_path(dst, comp.name)
  if os.path.exists(out_path) and not overwrite:
    raise ValueError(f"{out_path} exists; pass --overwrite to replace it")
  cfg = _read_json(os.path.join(comp_dir, "config.json"))

  t0 = time.time()
  tensors = weights.index_safetensors(comp_dir, comp.stem)
  abstract = comp.abstract_params(cfg, scanned)
  plan = weights.plan_conversion(tensors, comp.key_map(cfg, scanned), abstract)
  entry: dict[str, Any] = {
      "source": comp_dir,
      "files": sorted({os.path.basename(i.file) for i in tensors.values()}),
      "tensors_in_source": len(tensors),
      "checkpoint_bytes": sum(i.nbytes for i in tensors.values()),
      "source_dtypes": sorted({str(i.dtype) for i in tensors.values()}),
      "scanned": scanned,
      **plan.report(),
  }
  log(
      f"[{comp.name}] {len(tensors)} tensors in {len(entry['files'])} file(s), "
      f"{entry['checkpoint_bytes'] / 2**20:.1f} MiB"
  )
  if not plan.ok:
    entry["status"] = "invalid"
    log(f"[{comp.name}] does not match the model; nothing written:\n{plan.summary()}")
    return entry

  os.makedirs(dst, exist_ok=True)
  # Not a dot-name: orbax finds the pending partial saves with a glob, which skips hidden entries. Leftovers of an
  # interrupted run are removed first.
  prefix = f"{comp.name}.converting-"
  for stale in os.listdir(dst):
    if stale.startswith(prefix) and os.path.isdir(os.path.join(dst, stale)):
      shutil.rmtree(os.path.join(dst, stale))
  tmp = os.path.join(os.path.abspath(dst), f"{prefix}{os.getpid()}")
  try:
    rss_at_start = _rss_bytes()
    with MemoryMeter() as meter:
      stats = stream_convert(plan, tmp, dtype=out_dtype, batch_bytes=batch_bytes, meter=meter, log=log)
    _remove_tree(out_path)
    os.replace(tmp, out_path)
  finally:
    _remove_tree(tmp)
  with open(os.path.join(dst, f"{comp.name}.config.json"), "w") as f:
    json.dump(cfg, f, indent=2)
  copied = []
  for asset in comp.assets:
    asset_dir = os.path.join(src, asset)
    if os.path.isdir(asset_dir):
      os.makedirs(os.path.join(dst, asset), exist_ok=True)
      for name in sorted(os.listdir(asset_dir)):
        if name.endswith(_ASSET_SUFFIXES) and os.path.isfile(os.path.join(asset_dir, name)):
          shutil.copyfile(os.path.join(asset_dir, name), os.path.join(dst, asset, name))
          copied.append(f"{asset}/{name}")
  entry.update(
      status="ok",
      output=out_path,
      assets=copied,
      seconds=round(time.time() - t0, 3),
      peak_live_bytes=meter.peak_live,
      rss_at_start_bytes=rss_at_start,
      peak_rss_bytes=meter.peak_rss,
      **stats,
  )
  log(
      f"[{comp.name}] wrote {stats['parameters']} parameters ({stats['bytes_written'] / 2**20:.1f} MiB, "
      f"{', '.join(sorted(stats['dtypes']))}) to {out_path} in {entry['seconds']:.1f} s; peak held "
      f"{meter.peak_live / 2**20:.1f} MiB; RSS {rss_at_start / 2**20:.1f} MiB before streaming, peak "
      f"{meter.peak_rss / 2**20:.1f} MiB"
  )
  return entry


# ----------------------------------------------------------------------------- command line


def _parse(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m onestory_jax.convert", description=__doc__.split("\n")[0])
  p.add_argument("--src", required=True, help="Directory of the diffusers-format release.")
  p.add_argument("--dst", required=True, help="Output directory.")
  p.add_argument(
      "--components",
      default="",
      help="Comma-separated subset of transformer,vae,text_encoder,image_encoder,dinov2 "
      "(default: every one whose directory the release has).",
  )
  p.add_argument("--dtype", default="stored", help="stored (default) | float32 | bfloat16 | float16.")
  p.add_argument(
      "--scan_layers",
      action="store_true",
      help="Stack the DiT blocks for models run with config.model.scan_layers=True.",
  )
  p.add_argument(
      "--batch_mb",
      type=float,
      default=512.0,
      help="Converted MiB handed to orbax per partial save (bounds the host memory).",
  )
  p.add_argument("--overwrite", action="store_true", help="Replace existing outputs.")
  return p.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the converter; returns the exit status (0 ok, 1 a component does not match its model)."""
  args = _parse(sys.argv[1:] if argv is None else argv)
  if not os.path.isdir(args.src):
    raise ValueError(f"--src={args.src}: not a directory")
  if args.batch_mb <= 0:
    raise ValueError(f"--batch_mb: expected a positive number; got {args.batch_mb}")
  names = [c for c in args.components.split(",") if c] or [
      c.name for c in COMPONENTS.values() if os.path.isdir(os.path.join(args.src, c.subdir))
  ]
  unknown = [c for c in names if c not in COMPONENTS]
  if unknown or not names:
    raise ValueError(
        f"--components: {'unknown ' + str(unknown) if unknown else 'none found in ' + args.src}; "
        f"expected some of {sorted(COMPONENTS)}"
    )
  os.makedirs(args.dst, exist_ok=True)
  report: dict[str, Any] = {
      "src": os.path.abspath(args.src),
      "dst": os.path.abspath(args.dst),
      "dtype": args.dtype,
      "scan_layers": args.scan_layers,
      "rss_before_bytes": _rss_bytes(),
      "components": {},
  }
  for name in names:
    report["components"][name] = convert_component(
        args.src,
        args.dst,
        name,
        scanned=args.scan_layers,
        dtype=args.dtype,
        batch_bytes=int(args.batch_mb * 2**20),
        overwrite=args.overwrite,
    )
  report["maxrss_bytes"] = _maxrss_bytes()
  report["peak_rss_bytes"] = max(
      [report["rss_before_bytes"]] + [c.get("peak_rss_bytes", 0) for c in report["components"].values()]
  )
  report["ok"] = all(c["status"] == "ok" for c in report["components"].values())
  with open(os.path.join(args.dst, "report.json"), "w") as f:
    json.dump(report, f, indent=2)
  ckpt = sum(c["checkpoint_bytes"] for c in report["components"].values())
  print(
      f"source checkpoint {ckpt / 2**20:.1f} MiB; RSS before {report['rss_before_bytes'] / 2**20:.1f} MiB, "
      f"peak RSS {report['peak_rss_bytes'] / 2**20:.1f} MiB (getrusage maxrss {report['maxrss_bytes'] / 2**20:.1f}"
      f" MiB); report: {os.path.join(args.dst, 'report.json')}"
  )
  if not report["ok"]:
    bad = [n for n, c in report["components"].items() if c["status"] != "ok"]
    print(f"FAILED: {bad} do not match their models (see the lists above and report.json)", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  try:
    sys.exit(main())
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
