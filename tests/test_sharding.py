"""Mesh construction and logical-axis sharding: the tiny config concretely, the 14B config abstractly.

The 14B checks run on jax.eval_shape only (nothing is allocated): every parameter of the paper setting
(``wan21_i2v_14b_480p``) gets the sharding its logical names and ``config.logical_axis_rules`` say, divides its
shape, and every large one is split over ``fsdp``; AdamW's moments follow their parameters.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
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


# ----------------------------------------------------------------------------- mesh over slices (DCN)


class _FakeDevice:
  """Stands in for a TPU device of a multi-slice job (only what mesh construction reads)."""

  def __init__(self, i, slice_index):
    self.id, self.slice_index, self.process_index = i, slice_index, slice_index
    self.platform, self.device_kind = "cpu", "cpu"

  def __repr__(self):
    return f"D{self.id}@s{self.slice_index}"


def test_dcn_mesh_puts_the_dcn_factor_across_slices():
  config = load_config("tiny", **{"mesh.shape": (1, -1, 1, 2), "mesh.dcn_shape": (2, 1, 1, 1)})
  devices = [_FakeDevice(i, i // 4) for i in range(8)]  # 2 slices of 4
  array = sharding.mesh_device_array(config, devices)
  assert array.shape == (2, 2, 1, 2)  # data = 1 x 2 slices, fsdp = -1 -> 2 per slice, tensor 2
  for s in range(2):  # each data index is one whole slice: fsdp and tensor stay on fast links
    assert {d.slice_index for d in array[s].flat} == {s}
  with pytest.raises(ValueError, match=r"dcn_shape=\(4, 1, 1, 1\).*4 slices \(slice_index\) of 2 devices"):
    sharding.mesh_device_array(load_config("tiny", **{"mesh.dcn_shape": (4, 1, 1, 1)}), devices)
  with pytest.raises(ValueError, match="dcn_shape: expected 4 positive ints"):
    sharding.mesh_device_array(load_config("tiny", **{"mesh.dcn_shape": (2, 1)}), devices)
  # On this machine's 8 CPU devices (one process, no slices) a plain mesh is unchanged by dcn_shape = 1s.
  mesh = sharding.make_mesh(load_config("tiny", **{"mesh.shape": (2, 2, 2, 1)}))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "context": 2, "tensor": 1}
  assert sharding.context_parallelism(mesh, load_config("tiny")) == 2


# ----------------------------------------------------------------------------- the 14B config, abstractly

MESH_14B = (1, 2, 2, 2)  # data, fsdp, context, tensor
LARGE = 1 << 20  # elements; no parameter this large may be replicated


def _axes(entry):
  return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))


def _split(spec, mesh):
  return int(np.prod([mesh.shape[a] for e in spec for a in _axes(e)]))


@pytest.fixture(scope="module")
def abstract_14b():
  """The paper setting's OneStory parameters (Wan2.1-I2V-14B DiT, umT5-XXL, Frame Selection, Adaptive
  Conditioner), their shardings on a (1, 2, 2, 2) mesh and the AdamW state's, all from jax.eval_shape."""
  from onestory_jax import plan  # pylint: disable=g-import-not-at-top
  from onestory_jax import trainer as trainer_lib  # pylint: disable=g-import-not-at-top

  config = load_config("wan21_i2v_14b_480p", **{"mesh.shape": MESH_14B})
  system = plan.planning_system(config)  # no tokenizer files needed
  mesh = sharding.make_mesh(config)
  with sharding.use_mesh(mesh, config):  # the forward pass of init runs the sharded (context-parallel) attention
    boxed = jax.eval_shape(system.init_params, jax.random.key(0))
  params = sharding.strip_boxes(boxed)
  shardings = sharding.logical_to_shardings(boxed, mesh, config)
  tx = trainer_lib.make_optimizer(config, params)
  opt_state = jax.eval_shape(tx.init, params)
  opt_shardings = sharding.opt_state_shardings(tx, opt_state, shardings, mesh)
  return config, mesh, params, shardings, boxed, opt_state, opt_shardings


def test_every_14b_parameter_is_sharded_as_the_rules_say(abstract_14b):
  config, mesh, params, shardings, boxed, _, _ = abstract_14b
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  specs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  names = jax.tree.leaves(nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, P))
  assert len(leaves) == len(specs) == len(names) > 300  # (the 40 scanned DiT blocks are one stacked set)
  rules = dict(sharding.axis_rules(config))
  total = sum(int(np.prod(a.shape)) for _, a in leaves)
  assert 22.5e9 < total < 23.5e9  # DiT 16.4B + selection/conditioner 0.95B + umT5-XXL encoder 5.7B
  per_device = 0
  for (path, leaf), s, logical in zip(leaves, specs, names):
    key = jax.tree_util.keystr(path)
    assert isinstance(s, NamedSharding) and s.mesh.shape == mesh.shape, key
    assert len(s.spec) <= leaf.ndim, key
    # The spec is the rules applied to the parameter's logical names ('layers' of the scan: not sharded).
    for entry, name in zip(tuple(s.spec), tuple(logical)):
      assert _axes(entry) == _axes(rules.get(name)), (key, logical, s.spec)
    # ... and it divides the shape: no padded shards.
    for dim, entry in zip(leaf.shape, tuple(s.spec)):
      assert dim % _split((entry,), mesh) == 0, (key, leaf.shape, s.spec)
    size = int(np.prod(leaf.shape))
    if size >= LARGE:  # never replicated; most are split over both fsdp and tensor (checked below for the DiT)
      assert _split(s.spec, mesh) >= 2, (key, leaf.shape, s.spec)
    per_device += size * leaf.dtype.itemsize // _split(s.spec, mesh)
  # Every DiT block matrix is split over both fsdp and tensor (4 ways on this mesh).
  blocks = params["dit"]["blocks"]
  block_specs = shardings["dit"]["blocks"]
  for module, proj in [("attn1", "to_q"), ("attn1", "to_out_0"), ("attn2", "to_k"), ("attn2", "add_v_proj")]:
    assert blocks[module][proj]["kernel"].shape == (40, 5120, 5120)
    assert tuple(block_specs[module][proj]["kernel"].spec) in ((None, "fsdp", "tensor"), (None, "tensor", "fsdp"))
  assert tuple(block_specs["ffn"]["net_0"]["proj"]["kernel"].spec) == (None, "fsdp", "tensor")  # (embed, mlp)
  assert tuple(block_specs["ffn"]["net_2"]["kernel"].spec) == (None, "tensor", "fsdp")  # (mlp, embed)
  # What one device holds: about a quarter of the bytes (fsdp x tensor = 4; the context axis replicates
  # parameters). Matrices split over one axis only (e.g. umT5's token embedding, (vocab, embed) -> fsdp; Frame
  # Selection's phi_v conv, (.., conv_in, conv_out) -> tensor) keep it from being exactly a quarter.
  full = sum(int(np.prod(a.shape)) * a.dtype.itemsize for _, a in leaves)
  assert full / 4 <= per_device < 1.25 * full / 4, per_device / full


def test_14b_adamw_moments_are_sharded_like_their_parameters(abstract_14b):
  _, mesh, params, shardings, _, opt_state, opt_shardings = abstract_14b
  flat = jax.tree_util.tree_flatten_with_path(opt_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))[0]
  by_param = {
      jax.tree_util.keystr(p): s
      for p, s in jax.tree_util.tree_flatten_with_path(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))[0]
  }
  moments = 0
  for path, s in flat:
    key = jax.tree_util.keystr(path)
    if ".mu" in key or ".nu" in key:
      param_key = key[key.index("[", key.index(".mu" if ".mu" in key else ".nu")) :]
      assert s == by_param[param_key], key
      moments += 1
    else:
      assert s.spec == P(), key  # step counts
  # Two moments for every trained parameter (the umT5 encoder is frozen in the Wan configs: no moments).
  trained = [k for k in by_param if not k.startswith("['text_encoder']")]
  assert moments == 2 * len(trained)
  del mesh, params, opt_state


def test_14b_context_parallel_heads_divide():
  """The paper model's 40 heads split over tensor x context; a mesh they do not divide fails with a clear error."""
  config = load_config("wan21_i2v_14b_480p", **{"mesh.shape": (1, 1, 8, 1)})  # 40 heads over 8: 5 each
  assert config.model.num_heads % 8 == 0
  from onestory_jax.models import attention  # pylint: disable=g-import-not-at-top

  mesh = jax.make_mesh((1, 1, 4, 2), config.mesh.axes, axis_types=(jax.sharding.AxisType.Auto,) * 4)
  q = jax.ShapeDtypeStruct((1, 34320, 12, 128), jnp.bfloat16)  # 12 heads: 6 per tensor shard, not divisible by 4
  with sharding.use_mesh(mesh, config), pytest.raises(ValueError, match="12 attention heads, 6 per device"):
    jax.eval_shape(lambda q: attention.dot_product_attention(q, q, q, backend="xla"), q)
