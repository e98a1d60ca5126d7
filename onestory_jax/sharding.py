"""Device mesh and logical-axis sharding (MaxText / big_vision conventions; docs/sharding.md).

The mesh has four named axes ``(data, fsdp, context, tensor)`` sized from ``config.mesh.shape`` (one entry may be
-1 and is filled with the remaining devices). Multi-slice / multi-node runs add ``config.mesh.dcn_shape``: the
mesh is then ``shape * dcn_shape`` axis by axis, with the ``dcn_shape`` factor laid across slices (TPU
``slice_index``) or processes (GPU nodes), whose links are slow, and ``shape`` inside each one.

Parameters and activations carry *logical* axis names; the rules in ``config.logical_axis_rules`` map them onto
mesh axes. Axis types are ``Auto`` (GSPMD propagation), as Flax's logical partitioning expects on jax 0.10. The
``length`` rule decides context parallelism: when it maps the token sequence onto a mesh axis of size > 1, the DiT's
self-attention runs the all-to-all head/sequence swap (``onestory_jax.models.attention``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.experimental import mesh_utils
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


def dcn_shape(config) -> tuple[int, ...]:
  """``config.mesh.dcn_shape``, checked (all ones: a single slice / node)."""
  axes = tuple(config.mesh.axes)
  dcn = tuple(int(s) for s in config.mesh.dcn_shape)
  if len(dcn) != len(axes) or min(dcn) < 1:
    raise ValueError(
        f"config.mesh.dcn_shape: expected {len(axes)} positive ints, one per axis of "
        f"config.mesh.axes={axes}; got {dcn}"
    )
  return dcn


def mesh_device_array(config, devices: Sequence[Any]) -> np.ndarray:
  """The devices laid out as the mesh: ``[shape * dcn_shape]`` per axis (see the module docstring).

  Without DCN this is ``jax.make_mesh``'s topology-aware order. With DCN, devices are grouped into granules by
  ``slice_index`` (TPU multi-slice) or, where devices have none, by ``process_index`` (one GPU node per process);
  the number of granules must equal ``prod(dcn_shape)``.
  """
  devices = list(devices)
  axes = tuple(config.mesh.axes)
  dcn = dcn_shape(config)
  n_dcn = int(np.prod(dcn))
  if len(devices) % n_dcn:
    raise ValueError(f"config.mesh.dcn_shape={dcn} ({n_dcn} slices) does not divide {len(devices)} devices")
  shape = resolve_mesh_shape(config.mesh.shape, len(devices) // n_dcn)
  if len(shape) != len(axes):
    raise ValueError(f"config.mesh.shape has {len(shape)} entries but config.mesh.axes names {len(axes)}")
  if n_dcn == 1:
    return jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes), devices=devices).devices
  by_slice = hasattr(devices[0], "slice_index")
  try:
    return mesh_utils.create_hybrid_device_mesh(
        shape, dcn, devices, process_is_granule=not by_slice, allow_split_physical_axes=True
    )
  except ValueError as e:
    granule = "slices (slice_index)" if by_slice else "processes"
    raise ValueError(
        f"config.mesh.dcn_shape={dcn} with config.mesh.shape={shape}: the devices must form "
        f"{n_dcn} {granule} of {int(np.prod(shape))} devices each ({e})"
    ) from e


def make_mesh(config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The ``(data, fsdp, context, tensor)`` mesh of ``config.mesh`` over ``devices`` (default: all), Auto axes."""
  devices = list(jax.devices() if devices is None else devices)
  axes = tuple(config.mesh.axes)
  return Mesh(mesh_device_array(config, devices), axes, axis_types=(AxisType.Auto,) * len(axes))


def context_parallelism(mesh: Mesh, config) -> int:
  """How many devices split the token sequence: the size of the mesh axes that the ``length`` rule names."""
  axes = dict(axis_rules(config)).get("length")
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


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


def _fit(s: NamedSharding, leaf: Any) -> NamedSharding:
  spec = []
  for i, axes in enumerate(tuple(s.spec) + (None,) * (len(leaf.shape) - len(s.spec))):
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    spec.append(axes if leaf.shape[i] % int(np.prod([s.mesh.shape[a] for a in names])) == 0 else None)
  return NamedSharding(s.mesh, P(*spec))


def fitted_shardings(boxed_tree: Any, mesh: Mesh, config) -> Any:
  """:func:`logical_to_shardings`, with every dimension that its mesh axes do not divide replicated.

  For parameters laid out on a mesh they were not sized for: the frozen encoders (an RGB output conv's 3 channels
  under a 'conv_out' -> tensor rule) and the model on the sampling mesh (:func:`inference_mesh`); ``jit`` and
  ``device_put`` reject an indivisible dimension.
  """
  return jax.tree.map(_fit, logical_to_shardings(boxed_tree, mesh, config), strip_boxes(boxed_tree))


def inference_mesh(config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The sampling mesh over ``devices`` (default: all): the training mesh's axes, every device on ``fsdp``.

  A story is generated one shot at a time (batch 1), so the batch axes of the training mesh have nothing to split;
  the parameters are spread over every device by the logical rules (:func:`fitted_shardings`) and gathered layer by
  layer, and one device holds the whole model when there is one.
  """
  devices = list(jax.devices() if devices is None else devices)
  axes = tuple(config.mesh.axes)
  if "fsdp" not in axes:
    raise ValueError(f"config.mesh.axes={axes}: the sampling mesh needs an 'fsdp' axis")
  shape = tuple(len(devices) if a == "fsdp" else 1 for a in axes)
  return Mesh(np.asarray(devices).reshape(shape), axes, axis_types=(AxisType.Auto,) * len(axes))


def opt_state_shardings(tx: optax.GradientTransformation, opt_state: Any, param_shardings: Any, mesh: Mesh) -> Any:
  """Shardings of an optax state: every parameter-shaped leaf (AdamW's ``mu``, ``nu``) as its parameter.

  The optimiser state is built from unboxed parameters, so it carries no logical axis names;
  :func:`logical_to_shardings` alone would replicate the moments on every device (8 bytes per parameter). Leaves
  that are not per-parameter (step counts) are replicated; masked-out groups of ``optax.multi_transform``
  (``optax.MaskedNode``) stay as they are.

  Args:
    tx: the optimiser whose ``init`` built ``opt_state``.
    opt_state: the state, or its abstract (``jax.eval_shape``) version.
    param_shardings: NamedShardings in the structure of the parameters.
    mesh: the mesh of the replicated leaves.
  """
  masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
  return optax.tree_map_params(
      tx,
      lambda leaf, s: leaf if masked(leaf) else s,
      opt_state,
      param_shardings,
      transform_non_params=lambda _: replicated(mesh),
      is_leaf=masked,
  )


def train_state_shardings(boxed_state: Any, tx: optax.GradientTransformation, mesh: Mesh, config) -> Any:
  """Shardings of a train state (``step``, ``params``, ``opt_state``, ``rng`` fields, boxed parameters).

  Parameters by the logical rules, the optimiser state like the parameters (:func:`opt_state_shardings`), the
  step counter and the rng key replicated.
  """
  params = logical_to_shardings(boxed_state.params, mesh, config)
  return boxed_state.replace(
      step=replicated(mesh),
      rng=replicated(mesh),
      params=params,
      opt_state=opt_state_shardings(tx, strip_boxes(boxed_state.opt_state), params, mesh),
  )


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
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def with_shardings(tree: Any, shardings: Any) -> Any:
  """``tree`` (arrays or ``jax.ShapeDtypeStruct``) as abstract values that carry ``shardings`` (a matching tree)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def strip_boxes(tree: Any) -> Any:
  """Removes Flax partitioning metadata without applying sharding constraints (safe on abstract values)."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree, is_leaf=is_box)
