"""Published weights -> Flax parameters: the shared vocabulary of the converters.

Every ported module (the Wan DiT, the Wan VAE, umT5, CLIP vision) exposes a pure function that maps one tensor name
of the published (diffusers / transformers) safetensors layout to a :class:`Target`: where the tensor goes in the
module's Flax parameter tree and how its layout changes. The converter (:mod:`onestory_jax.convert`) streams the
safetensors shards through these maps, so no module ever needs the whole checkpoint in memory.

Layout conventions: PyTorch ``Linear`` stores ``[out, in]``, Flax ``Dense`` ``[in, out]``; PyTorch ``ConvNd`` stores
``[out, in, *kernel]``, Flax ``Conv`` ``[*kernel, in, out]``.

Key maps: a module's map takes one published name and returns a :class:`Target`; it returns ``None`` for a name it
knows and deliberately drops (e.g. a tensor that the reference itself ignores on load, or a tied duplicate), and
raises ``ValueError`` for a name it does not know. The converter reports the first kind as *ignored* and the second
as *unexpected*.

Besides that vocabulary this module holds the pieces the converter and the loaders share:

* reading safetensors files one tensor at a time (:func:`index_safetensors`, :func:`read_tensor`). The format is an
  8-byte little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}}`` and the raw data;
  tensors are read with a positioned ``readinto`` into a fresh array, so only that array is resident. (Not
  ``safetensors.safe_open(framework="numpy")``: numpy has no bfloat16, the dtype of the Wan releases, and that
  reader maps the whole file, whose touched pages then stay resident while it is open.) Nothing is ever unpickled;
* validation of a published checkpoint against a module's abstract parameter tree (:func:`plan_conversion`): every
  key and shape, before any tensor data is read;
* :func:`load_converted`, which restores a converted component straight into its sharded layout.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

Transform = Callable[[np.ndarray], np.ndarray]


def identity(x: np.ndarray) -> np.ndarray:
  return x


def linear(x: np.ndarray) -> np.ndarray:
  """PyTorch ``Linear`` weight ``[out, in]`` -> Flax ``Dense`` kernel ``[in, out]``."""
  if x.ndim != 2:
    raise ValueError(f"linear weight: expected 2 dims [out, in], got shape {x.shape}")
  return np.ascontiguousarray(x.T)


def conv(x: np.ndarray) -> np.ndarray:
  """PyTorch ``ConvNd`` weight ``[out, in, *kernel]`` -> Flax ``Conv`` kernel ``[*kernel, in, out]``."""
  if x.ndim < 3:
    raise ValueError(f"conv weight: expected [out, in, *kernel], got shape {x.shape}")
  return np.ascontiguousarray(np.moveaxis(np.moveaxis(x, 0, -1), 0, -2))


@dataclasses.dataclass(frozen=True)
class Target:
  """Where one published tensor goes.

  Attributes:
    path: the Flax parameter path, e.g. ``("blocks_0", "attn1", "to_q", "kernel")``.
    transform: published layout -> Flax layout (:func:`identity`, :func:`linear`, :func:`conv`, ...).
    layer: for parameters of scanned layers (stacked on a leading axis), the index along that axis; else ``None``.
  """

  path: tuple[str, ...]
  transform: Transform = identity
  layer: int | None = None


KeyMap = Callable[[str], "Target | None"]

# ----------------------------------------------------------------------------- safetensors

SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype(bool),
}
_MAX_HEADER_BYTES = 100 * 2**20


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """One tensor of a safetensors file, located but not read.

  Attributes:
    name: the tensor's name in the file.
    file: path of the file.
    dtype: numpy dtype of the stored data.
    shape: stored shape.
    offset: absolute byte offset of the data in ``file``.
  """

  name: str
  file: str
  dtype: np.dtype
  shape: tuple[int, ...]
  offset: int

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize


def positive_int_fields(cfg: Mapping[str, Any], fields: Mapping[str, str], what: str) -> dict[str, int]:
  """``{ours: cfg[theirs]}`` for the size fields of a release's ``config.json``.

  Raises:
    ValueError: a field is missing or not a positive int (``what`` names the config in the message).
  """
  out = {}
  for ours, theirs in fields.items():
    value = cfg.get(theirs)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{what}: field {theirs!r} must be a positive int, got {value!r}")
    out[ours] = value
  return out


def read_safetensors_header(path: str) -> dict[str, TensorInfo]:
  """The tensors of one ``.safetensors`` file (name -> :class:`TensorInfo`), from its header only."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) != 8:
      raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    n = int.from_bytes(head, "little")
    if n > min(size - 8, _MAX_HEADER_BYTES):
      raise ValueError(f"{path}: not a safetensors file (header length {n} exceeds the file size {size})")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{path}: not a safetensors file (header is not JSON: {e})") from e
  if not isinstance(header, dict):
    raise ValueError(f"{path}: safetensors header must be a JSON object")
  base = 8 + n
  out = {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    try:
      code, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
    except (TypeError, KeyError, ValueError) as e:
      raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {entry!r}") from e
    if code not in SAFETENSORS_DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has dtype {code!r}; expected one of {sorted(SAFETENSORS_DTYPES)}")
    info = TensorInfo(name, path, SAFETENSORS_DTYPES[code], shape, base + int(begin))
    if int(end) - int(begin) != info.nbytes or min(shape, default=0) < 0 or base + int(end) > size:
      raise ValueError(
          f"{path}: tensor {name!r} ({code} {list(shape)}) has data_offsets [{begin}, {end}] that do "
          f"not match its size {info.nbytes} or lie beyond the file end ({size} bytes)"
      )
    out[name] = info
  return out


def safetensors_files(directory: str, stem: str) -> list[str]:
  """The weight files of one component directory, in order.

  Either ``{stem}.safetensors.index.json`` (its ``weight_map`` names the shards) or a single
  ``{stem}.safetensors``; diffusers uses the stem ``diffusion_pytorch_model``, transformers ``model``.
  """
  index = os.path.join(directory, f"{stem}.safetensors.index.json")
  single = os.path.join(directory, f"{stem}.safetensors")
  if os.path.exists(index):
    with open(index) as f:
      try:
        weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: expected JSON with a 'weight_map' object (tensor name -> shard file)") from e
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not os.path.exists(os.path.join(directory, f))]
    if missing:
      raise ValueError(f"{index}: names shard files that do not exist in {directory}: {missing}")
    return [os.path.join(directory, f) for f in files]
  if os.path.exists(single):
    return [single]
  pickles = [f for f in sorted(os.listdir(directory)) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
  hint = f" (found {pickles}: pickled torch files are never loaded; use the safetensors release)" if pickles else ""
  raise ValueError(f"{directory}: expected {stem}.safetensors or {stem}.safetensors.index.json{hint}")


def index_safetensors(directory: str, stem: str) -> dict[str, TensorInfo]:
  """All tensors of a (possibly sharded) component directory, located from the headers only.

  Raises:
    ValueError: a tensor present in two shards, or an index ``weight_map`` that disagrees with the shard headers.
  """
  files = safetensors_files(directory, stem)
  out: dict[str, TensorInfo] = {}
  for path in files:
    for name, info in read_safetensors_header(path).items():
      if name in out:
        raise ValueError(f"{directory}: tensor {name!r} is stored twice, in {out[name].file} and {path}")
      out[name] = info
  index = os.path.join(directory, f"{stem}.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    wrong = sorted(
        k for k, v in weight_map.items() if k not in out or os.path.basename(out[k].file) != os.path.basename(v)
    )
    if wrong:
      raise ValueError(
          f"{index}: weight_map disagrees with the shard headers for {wrong[:10]}"
          f"{' ...' if len(wrong) > 10 else ''}"
      )
  return out


def read_tensor(info: TensorInfo) -> np.ndarray:
  """Reads one tensor into a fresh array (no memory map: only this array becomes resident)."""
  if sys.byteorder != "little" and info.dtype.itemsize > 1:
    raise ValueError(f"{info.file}: reading little-endian safetensors on a big-endian host is not supported")
  out = np.empty(info.shape, info.dtype)
  if out.size:
    with open(info.file, "rb", buffering=0) as f:
      f.seek(info.offset)
      got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
    if got != info.nbytes:
      raise ValueError(f"{info.file}: tensor {info.name!r} is truncated ({got} of {info.nbytes} bytes)")
  return out


# ----------------------------------------------------------------------------- validation


def flatten_tree(tree: Any) -> dict[tuple[str, ...], Any]:
  """A nested dict of leaves -> {path tuple: leaf}."""
  out = {}

  def walk(node, prefix):
    if isinstance(node, Mapping):
      for k, v in node.items():
        walk(v, prefix + (str(k),))
    else:
      out[prefix] = node

  walk(tree, ())
  return out


def unflatten_tree(flat: Mapping[tuple[str, ...], Any]) -> dict:
  """Inverse of :func:`flatten_tree`."""
  out: dict = {}
  for path, leaf in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = leaf
  return out


def path_str(path: tuple[str, ...], layer: int | None = None) -> str:
  return "/".join(path) + ("" if layer is None else f"[layer {layer}]")


def transformed_shape(transform: Transform, shape: tuple[int, ...]) -> tuple[int, ...] | None:
  """Shape after ``transform`` without reading data: applies it to a zero-byte proxy array.

  Returns None when the transform cannot run on a proxy (then the shape is checked when the tensor is read).
  """
  try:
    return tuple(transform(np.empty(shape, np.dtype([]))).shape)
  except Exception:  # pylint: disable=broad-except
    return None


@dataclasses.dataclass
class Slot:
  """One destination parameter and the published tensors that fill it.

  ``sources`` maps the layer index (None for an unstacked parameter) to (tensor, transform).
  """

  path: tuple[str, ...]
  shape: tuple[int, ...]
  stacked: bool
  sources: dict[int | None, tuple[TensorInfo, Transform]] = dataclasses.field(default_factory=dict)

  @property
  def item_shape(self) -> tuple[int, ...]:
    return self.shape[1:] if self.stacked else self.shape


@dataclasses.dataclass
class ConversionPlan:
  """Where every published tensor goes, and everything that does not fit.

  Attributes:
    slots: destination path -> :class:`Slot`, for the parameters that some tensor fills.
    missing: destination parameters (``a/b/kernel`` or ``a/b/kernel[layer i]``) that no tensor fills.
    unexpected: (published name, reason) for tensors that the key map does not know, or that map outside the tree.
    shape_mismatches: (published name, destination, expected shape, shape after the transform).
    conflicts: (published name, reason): two tensors for one destination, or stacked and unstacked targets mixed.
    ignored: published names that the key map deliberately drops (it returned None).
  """

  slots: dict[tuple[str, ...], Slot]
  missing: list[str]
  unexpected: list[tuple[str, str]]
  shape_mismatches: list[tuple[str, str, tuple[int, ...], tuple[int, ...]]]
  conflicts: list[tuple[str, str]]
  ignored: list[str]

  @property
  def ok(self) -> bool:
    return not (self.missing or self.unexpected or self.shape_mismatches or self.conflicts)

  def report(self) -> dict:
    """The validation part of report.json."""
    return {
        "valid": self.ok,
        "missing": list(self.missing),
        "unexpected": [{"key": k, "reason": r} for k, r in self.unexpected],
        "shape_mismatches": [
            {"key": k, "target": t, "expected": list(e), "got": list(g)} for k, t, e, g in self.shape_mismatches
        ],
        "conflicts": [{"key": k, "reason": r} for k, r in self.conflicts],
        "ignored": list(self.ignored),
    }

  def summary(self, limit: int = 20) -> str:
    """Readable lines for the console."""
    lines = []

    def block(title, items):
      if items:
        lines.append(f"  {title} ({len(items)}):")
        lines.extend(f"    {x}" for x in items[:limit])
        if len(items) > limit:
          lines.append(f"    ... {len(items) - limit} more (see report.json)")

    block("missing keys", self.missing)
    block("unexpected keys", [f"{k}: {r}" for k, r in self.unexpected])
    block(
        "shape mismatches", [f"{k} -> {t}: expected {list(e)}, got {list(g)}" for k, t, e, g in self.shape_mismatches]
    )
    block("conflicts", [f"{k}: {r}" for k, r in self.conflicts])
    return "\n".join(lines)


def plan_conversion(tensors: Mapping[str, TensorInfo], key_map: KeyMap, abstract_tree: Any) -> ConversionPlan:
  """Checks every published tensor name and shape against a module's abstract parameter tree.

  Reads headers only. A :class:`Target` with ``layer`` set addresses a stacked parameter (scanned layers): its
  leading axis is the layer axis and the tensor must have the shape of the remaining axes.

  Args:
    tensors: name -> :class:`TensorInfo` (:func:`index_safetensors`).
    key_map: the module's published-name -> :class:`Target` function.
    abstract_tree: nested dict whose leaves have ``.shape`` (``jax.ShapeDtypeStruct`` or arrays), unboxed.
  """
  leaves = flatten_tree(abstract_tree)
  slots: dict[tuple[str, ...], Slot] = {}
  unexpected, mismatched, conflicts, ignored = [], [], [], []
  for name in sorted(tensors):
    info = tensors[name]
    try:
      target = key_map(name)
    except ValueError as e:
      unexpected.append((name, str(e)))
      continue
    if target is None:
      ignored.append(name)
      continue
    path = tuple(target.path)
    if path not in leaves:
      unexpected.append((name, f"maps to {path_str(path)}, which is not a parameter of the model"))
      continue
    shape = tuple(leaves[path].shape)
    slot = slots.setdefault(path, Slot(path, shape, target.layer is not None))
    if slot.stacked != (target.layer is not None):
      conflicts.append((name, f"{path_str(path)} is addressed both per layer and as a whole"))
      continue
    if slot.stacked and not (shape and 0 <= target.layer < shape[0]):
      unexpected.append(
          (name, f"layer {target.layer} of {path_str(path)}, whose shape {list(shape)} has no such " f"layer")
      )
      continue
    if target.layer in slot.sources:
      conflicts.append(
          (name, f"{path_str(path, target.layer)} is also filled by " f"{slot.sources[target.layer][0].name!r}")
      )
      continue
    got = transformed_shape(target.transform, info.shape)
    if got is not None and got != slot.item_shape:
      mismatched.append((name, path_str(path, target.layer), slot.item_shape, got))
      continue
    slot.sources[target.layer] = (info, target.transform)
  missing = []
  for path, leaf in leaves.items():
    slot = slots.get(path)
    if slot is None:
      missing.append(path_str(path))
    elif slot.stacked:
      missing.extend(path_str(path, i) for i in range(slot.shape[0]) if i not in slot.sources)
    elif None not in slot.sources:
      missing.append(path_str(path))
  slots = {p: s for p, s in slots.items() if s.sources}
  return ConversionPlan(slots, missing, unexpected, mismatched, conflicts, ignored)


# ----------------------------------------------------------------------------- loading converted checkpoints


def converted_path(dst: str, component: str) -> str:
  """Where :mod:`onestory_jax.convert` writes ``component`` under ``dst``."""
  return os.path.join(os.path.abspath(dst), component)


def load_converted(dst: str, component: str, abstract_tree: Any, shardings: Any = None) -> Any:
  """Restores a converted component straight into its sharded layout.

  Every device reads only its own shard of every parameter (orbax restore onto ``jax.ShapeDtypeStruct`` targets
  that carry shardings), so no host ever holds a full replica; stored dtypes are cast to the dtypes of
  ``abstract_tree``.

  Args:
    dst: the ``--dst`` directory of the conversion.
    component: ``transformer``, ``vae``, ``text_encoder`` or ``image_encoder``.
    abstract_tree: the module's parameter tree (``jax.eval_shape`` of its init), boxed or not.
    shardings: a matching tree of ``jax.sharding.Sharding``; None places everything on the default device.

  Raises:
    ValueError: no converted checkpoint there, or its keys / shapes differ from ``abstract_tree``.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint.experimental.v1 as ocp  # pylint: disable=g-import-not-at-top
  from onestory_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top

  path = converted_path(dst, component)
  if not os.path.isdir(path) or not ocp.is_orbax_checkpoint(path):
    raise ValueError(
        f"load_converted: no converted {component!r} checkpoint at {path}; run "
        f"python -m onestory_jax.convert --src=<release> --dst={dst} --components={component}"
    )
  abstract = sharding_lib.strip_boxes(abstract_tree)
  stored = flatten_tree(ocp.metadata(path).metadata)
  wanted = flatten_tree(abstract)
  problems = [f"missing in the checkpoint: {path_str(p)}" for p in wanted if p not in stored]
  problems += [f"not in the model: {path_str(p)}" for p in stored if p not in wanted]
  problems += [
      f"{path_str(p)}: checkpoint {list(stored[p].shape)}, model {list(wanted[p].shape)}"
      for p in wanted
      if p in stored and tuple(stored[p].shape) != tuple(wanted[p].shape)
  ]
  if problems:
    raise ValueError(
        f"load_converted: {path} does not match the model's parameter tree:\n  " + "\n  ".join(problems[:50])
    )
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return ocp.load(path, target)
