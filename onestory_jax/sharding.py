"""Device mesh and logical-axis sharding (MaxText / big_vision conventions).

The mesh has four named axes ``(data, fsdp, context, tensor)`` sized from ``config.mesh.shape`` (one entry may be
-1 and is filled with the remaining devices). Parameters and activations carry *logical* axis names; the rules in
``config.logical_axis_rules`` map them onto mesh axes. Axis types are ``Auto`` (GSPMD propagation), as Flax's
logical partitioning expects on jax 0.10.
"""
from __future__ import annotations

import contextlib
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fills a single -1 entry; checks that the product equals ``num_devices``."""
  shape = tuple(int(s) for s in shape)
  if sum(s == -1 for s in shape) > 1:
    raise ValueError(f"config.mesh.shape: at most one entry may be -1, got {shape}")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"config.mesh.shape: entries must be positive or -1, got {shape}")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"config.mesh.shape={shape} does not divide {num_devices} devices")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if int(np.prod(shape)) != num_devices:
    raise ValueError(f"config.mesh.shape={shape} needs {int(np.prod(shape))} devices, have {num_devices}")
  return shape


def make_mesh(config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  axes = tuple(config.mesh.axes)
  shape = resolve_mesh_shape(config.mesh.shape, len(devices))
  if len(shape) != len(axes):
    raise ValueError(f"config.mesh.shape has {len(shape)} entries but config.mesh.axes names {len(axes)}")
  return jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes), devices=devices)


def axis_rules(config) -> tuple[tuple[str, Any], ...]:
  return tuple((name, tuple(ax) if isinstance(ax, (list, tuple)) else ax) for name, ax in config.logical_axis_rules)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, config):
  """Sets the mesh and the logical rules for tracing (``jax.set_mesh`` + ``nn.logical_axis_rules``)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules(config)):
    yield


def logical_to_shardings(logical_tree: Any, mesh: Mesh, config) -> Any:
  """Maps a tree of logical PartitionSpecs (or boxed abstract values) to NamedShardings on ``mesh``."""
  specs = nn.get_partition_spec(logical_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, axis_rules(config))


def batch_sharding(mesh: Mesh, config) -> NamedSharding:
  """Leading (batch) axis over the mesh axes that the ``batch`` rule names; the rest replicated."""
  rules = dict(axis_rules(config))
  return NamedSharding(mesh, P(rules.get("batch")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh, config) -> int:
  axes = dict(axis_rules(config)).get("batch")
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def host_local_to_global(batch: dict, mesh: Mesh, config) -> dict:
  """Assembles per-process batches into global arrays sharded along the batch axis."""
  sharding = batch_sharding(mesh, config)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def strip_boxes(tree: Any) -> Any:
  """Removes Flax partitioning metadata without applying sharding constraints (safe on abstract values)."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree, is_leaf=is_box)
