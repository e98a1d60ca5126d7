"""Mesh construction and logical-axis sharding."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from onestory_jax import next_shot
from onestory_jax import sharding
from tests.helpers import load_config


def test_resolve_mesh_shape():
  assert sharding.resolve_mesh_shape((-1, 1, 1, 1), 8) == (8, 1, 1, 1)
  assert sharding.resolve_mesh_shape((2, -1, 1, 2), 8) == (2, 2, 1, 2)
  with pytest.raises(ValueError, match="at most one"):
    sharding.resolve_mesh_shape((-1, -1, 1, 1), 8)
  with pytest.raises(ValueError, match="does not divide"):
    sharding.resolve_mesh_shape((3, -1, 1, 1), 8)
  with pytest.raises(ValueError, match="needs 4 devices"):
    sharding.resolve_mesh_shape((2, 2, 1, 1), 8)


def test_mesh_and_batch_sharding():
  config = load_config("tiny", **{"mesh.shape": (2, 2, 1, 2)})
  mesh = sharding.make_mesh(config)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "context": 1, "tensor": 2}
  assert sharding.batch_divisor(mesh, config) == 4
  assert sharding.batch_sharding(mesh, config).spec == P(("data", "fsdp"))
  x = {"a": np.arange(8 * 3).reshape(8, 3)}
  g = sharding.host_local_to_global(x, mesh, config)
  assert g["a"].shape == (8, 3)
  np.testing.assert_array_equal(np.asarray(g["a"]), x["a"])


def test_every_parameter_has_a_logical_sharding():
  config = load_config("tiny", **{"mesh.shape": (2, 2, 1, 2)})
  mesh = sharding.make_mesh(config)
  system = next_shot.make_system(config)
  with sharding.use_mesh(mesh, config):
    boxed = jax.eval_shape(system.init_params, jax.random.key(0))
    shardings = sharding.logical_to_shardings(boxed, mesh, config)
  flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
  specs = {jax.tree_util.keystr(k): s.spec for k, s in flat}
  assert len(specs) == len(jax.tree.leaves(sharding.strip_boxes(boxed)))
  q = [v for k, v in specs.items() if "blocks_0" in k and "attn1" in k and "to_q" in k and "kernel" in k][0]
  assert q == P("fsdp", "tensor")  # (embed, heads)
  ffn = [v for k, v in specs.items() if "blocks_1" in k and "ffn" in k and "net_0" in k and "kernel" in k][0]
  assert ffn == P("fsdp", "tensor")  # (embed, mlp)
