"""Train steps of the tiny config under every mesh layout equal the same steps on one device.

Each layout builds an ``onestory_jax.trainer.Trainer`` on 8 simulated CPU devices (``config.mesh.shape`` =
(data, fsdp, context, tensor)): data parallel (8,1,1,1), FSDP (1,8,1,1), FSDP + tensor (2,2,1,2), and context
parallel (2,1,4,1), where the DiT's token sequence (64 noise + 16 context tokens) is split over 4 devices and
self-attention runs the Ulysses all-to-all. (Context together with tensor parallelism, heads split over both, is
checked at the attention level in tests/test_attention.py; a fifth compiled layout here would cost ~15 s more.) The reference is the same Trainer on one device (1,1,1,1). The tiny
config's 2 heads become 4 so that the context axis divides them.

All runs start from one state (random parameters, including the normally zero-initialised output projection, so
that every parameter gets a gradient at the first step) and take the same two batches: step 1 (learning rate 0 at
the first warm-up step) fills the AdamW moments from the gradients, step 2 moves the parameters.

Tolerances (float32): the layouts compute the same mathematics and differ only in the order of floating-point
reductions (partial matmul sums over ``fsdp``/``tensor`` shards, gradient all-reduces, attention after the
all-to-all), which moves results by a few float32 ulps (~1e-7 relative; measured: losses equal to 5e-7, parameters
to 2e-7). Checked: losses and gradient norms to 1e-5 relative; AdamW moments to 1e-4 relative plus 1e-6 of the
largest moment (gradients that are zero in exact arithmetic, such as those of the attention key biases, are pure
rounding noise of order 1e-13 and differ in relative terms); parameters after the update to 1e-6 absolute, 0.4% of
the step's update (learning rate 5e-4, Adam steps of about the learning rate). A wrong layout (for instance a
mis-ordered head/sequence swap) changes the loss at the first decimal.
"""

import concurrent.futures

import jax
import numpy as np
import pytest

from onestory_jax import sharding
from onestory_jax import trainer as trainer_lib
from tests.helpers import load_config

LAYOUTS = {
    "data": (8, 1, 1, 1),
    "fsdp": (1, 8, 1, 1),
    "fsdp_tensor": (2, 2, 1, 2),
    "context": (2, 1, 4, 1),
}


def _config(shape):
  return load_config("tiny", **{"mesh.shape": shape, "model.num_heads": 4})


def _random_state(trainer, seed=0):
  """Host arrays shaped like ``trainer``'s state: random parameters, zero optimiser moments."""
  rng = np.random.default_rng(seed)
  abstract = trainer.program.abstract_state

  def param(path, a):
    name = jax.tree_util.keystr(path[-1:])
    noise = rng.standard_normal(a.shape).astype(a.dtype)
    return (1.0 + 0.1 * noise) if "scale" in name else 0.05 * noise

  params = jax.tree_util.tree_map_with_path(param, abstract.params)
  opt_state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract.opt_state)
  return abstract.replace(step=np.zeros((), np.int32), params=params, opt_state=opt_state, rng=None)


def _build(shape, devices=None):
  """A Trainer for ``shape`` (on ``devices``, default all 8), and its step lowered for the given batches."""
  config = _config(shape)
  if devices is None:
    return trainer_lib.Trainer(config)
  with pytest.MonkeyPatch.context() as mp:  # the Trainer builds its mesh over jax.devices(); use a subset
    make_mesh = sharding.make_mesh
    mp.setattr(sharding, "make_mesh", lambda c, d=None: make_mesh(c, devices))
    return trainer_lib.Trainer(config)


def _lower(trainer, host_state, rng_data, batches):
  state = jax.device_put(host_state.replace(rng=jax.random.wrap_key_data(rng_data)), trainer.program.state_shardings)
  batches = [sharding.host_local_to_global(b, trainer.mesh, trainer.config) for b in batches]
  with sharding.use_mesh(trainer.mesh, trainer.config):
    lowered = trainer.program.step.lower(state, batches[0], trainer.enc)
  return lowered, state, batches, trainer.enc


def _run(compiled, state, batches, enc):
  metrics = []
  for batch in batches:
    state, m = compiled(state, batch, enc)
    metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics


@pytest.fixture(scope="module")
def runs():
  """Two steps of every layout and of the one-device reference, from the same state and batches."""
  assert jax.device_count() == 8
  reference = _build((1, 1, 1, 1), jax.devices()[:1])
  host_state = _random_state(reference)
  rng_data = np.asarray(jax.random.key_data(jax.random.key(0)))
  it = iter(reference.dataset())
  batches = [next(it), next(it)]
  trainers = {"one_device": reference, **{name: _build(shape) for name, shape in LAYOUTS.items()}}
  lowered = {name: _lower(tr, host_state, rng_data, batches) for name, tr in trainers.items()}
  with concurrent.futures.ThreadPoolExecutor(2) as pool:  # XLA compiles outside the GIL
    compiled = dict(zip(lowered, pool.map(lambda l: l[0].compile(), lowered.values())))
  out = {name: _run(compiled[name], *lowered[name][1:]) for name in lowered}
  all_to_alls = {name: l[0].as_text().count("all_to_all") for name, l in lowered.items()}
  return out, trainers, all_to_alls


def _close(a, b, rtol, atol=0.0):
  np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=rtol, atol=atol)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_one_device(runs, layout):
  out, trainers, _ = runs
  (ref_state, ref_metrics), (state, metrics) = out["one_device"], out[layout]
  mesh = trainers[layout].mesh
  assert dict(mesh.shape) == dict(zip(mesh.axis_names, LAYOUTS[layout]))
  for m_ref, m in zip(ref_metrics, metrics):
    for key in ("loss", "l_shot", "l_sel", "grad_norm"):
      _close(m_ref[key], m[key], rtol=1e-5)
  assert int(state.step) == 2
  for ref_moments, moments in ((ref_state.opt_state, state.opt_state),):
    leaves = [(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(ref_moments), jax.tree.leaves(moments))]
    largest = max(float(np.abs(a).max()) for a, _ in leaves if a.dtype.kind == "f")
    for a, b in leaves:
      _close(a, b, rtol=1e-4, atol=1e-6 * largest)
  paths = jax.tree_util.tree_flatten_with_path(ref_state.params)[0]
  for (path, a), b in zip(paths, jax.tree.leaves(state.params)):
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-6, jax.tree_util.keystr(path)


def test_steps_really_train_and_shard(runs):
  """The comparison is not vacuous: step 2 moved the parameters of every module, losses are finite, and the layouts
  really shard (FSDP- and tensor-sharded kernels; the context layout's self-attention runs the all-to-alls)."""
  out, trainers, all_to_alls = runs
  state, metrics = out["one_device"]
  first = _random_state(trainers["one_device"])
  # Adam's first real step moves a parameter by about the learning rate (2.5e-4 at step 2) unless its gradient is
  # zero in exact arithmetic (attention key biases; the patchifiers of kernels the tiny budget never allocates).
  moved = {
      module: [
          float(np.abs(np.asarray(a) - np.asarray(b)).max())
          for a, b in zip(jax.tree.leaves(first.params[module]), jax.tree.leaves(state.params[module]))
      ]
      for module in first.params
  }
  everything = np.concatenate([np.asarray(m) for m in moved.values()])
  assert np.mean(everything > 1e-5) > 0.8 and everything.max() < 1e-2
  assert all(max(m) > 1e-4 for m in moved.values()), {k: max(m) for k, m in moved.items()}
  assert all(np.isfinite(float(m["loss"])) for m in metrics)
  q_kernel = lambda name: tuple(
      trainers[name].program.state_shardings.params["dit"]["blocks_0"]["attn1"]["to_q"]["kernel"].spec
  )
  assert q_kernel("fsdp") == q_kernel("fsdp_tensor") == ("fsdp", "tensor")  # (embed, heads)
  # Frame Selection's D x D conv kernel is stored over fsdp too (its input channels), and gathered where it is used.
  conv = lambda name, i: tuple(
      trainers[name].program.state_shardings.params["frame_selection"]["phi_v"][f"conv_{i}"]["kernel"].spec
  )
  assert conv("fsdp_tensor", 1) == (None, None, "fsdp", "tensor") and conv("fsdp_tensor", 0) == (
      None,
      None,
      None,
      "tensor",
  )
  assert sharding.context_parallelism(trainers["context"].mesh, trainers["context"].config) == 4
  # Two DiT blocks, forward and backward: q, k, v and the output swapped in each self-attention.
  assert all_to_alls["context"] > 0 and all_to_alls["fsdp_tensor"] == all_to_alls["one_device"] == 0
