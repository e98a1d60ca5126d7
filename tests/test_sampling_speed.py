"""What makes sampling fast keeps its results: guidance in one batched DiT call gives the velocities that separate
calls give, and the persistent compilation cache stores the programs of an entry point's run."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onestory_jax import checkpoints
from onestory_jax import compilation_cache
from onestory_jax import next_shot
from onestory_jax import sampler
from tests.helpers import ROOT


def _condition_pair():
  system, params, enc = checkpoints.load_for_sampling(None)
  f, h, w, c = system.latent_shape
  rng = np.random.default_rng(0)
  memory = jnp.asarray(rng.normal(size=(2, 2 * f, h, w, c)), jnp.float32)
  mask = jnp.asarray([[True] * (2 * f), [True] * f + [False] * f])
  tokens = system.tokenizer.encode(["a red round character moves left.", "the same first round character."])
  d = system.config.data
  image = jnp.zeros((2, d.height, d.width, 3), jnp.float32)
  cond = system.condition(params, enc, tokens, memory, mask, start_image=image, start_present=jnp.zeros((2,), bool))
  nomem = system.condition(
      params, enc, tokens, memory, jnp.zeros_like(mask), start_image=image, start_present=jnp.zeros((2,), bool)
  )
  x = jnp.asarray(rng.normal(size=(2, f, h, w, c)), jnp.float32)
  t = jnp.asarray([0.3, 0.8], jnp.float32)
  return system, params, cond, nomem, x, t


def test_guidance_rows_give_every_velocity_in_one_call():
  system, params, cond, nomem, x, t = _condition_pair()
  rows = next_shot.stack_rows([cond, cond.replace(text=cond.null_text), nomem])
  assert rows.text.shape[0] == 6 and rows.context["mask"].shape[0] == 6
  assert not bool(jnp.any(nomem.context["mask"])) and bool(jnp.all(jnp.any(cond.context["mask"], axis=1)))
  assert not bool(jnp.any(nomem.image)) and bool(jnp.any(cond.image))  # the memory's image condition goes too
  every = system.velocity(params, rows, jnp.concatenate([x, x, x]), jnp.concatenate([t, t, t]))
  with_caption = system.velocity(params, cond, x, t)
  without = system.velocity(params, cond.replace(text=cond.null_text), x, t)
  no_memory = system.velocity(params, nomem, x, t)
  np.testing.assert_allclose(every[:2], with_caption, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(every[2:4], without, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(every[4:], no_memory, atol=1e-5, rtol=1e-5)
  assert float(jnp.max(jnp.abs(with_caption - without))) > 1e-3  # the caption matters: the rows are not one
  assert float(jnp.max(jnp.abs(with_caption - no_memory))) > 1e-3  # and so does the memory

  # v = v_u + g (v_c - v_u) + g_m (v_c - v_nomem), for every combination of the optional rows.
  v_c, v_u, v_n = with_caption, without, no_memory
  np.testing.assert_allclose(
      sampler.guided_velocity(every, 3.0, 1.5), v_u + 3 * (v_c - v_u) + 1.5 * (v_c - v_n), atol=1e-4, rtol=1e-5
  )
  np.testing.assert_allclose(sampler.guided_velocity(every[:4], 3.0, 0.0), v_u + 3 * (v_c - v_u), atol=1e-4, rtol=1e-5)
  two = jnp.concatenate([v_c, v_n])
  np.testing.assert_allclose(sampler.guided_velocity(two, 1.0, 2.0), v_c + 2 * (v_c - v_n), atol=1e-4, rtol=1e-5)
  np.testing.assert_array_equal(sampler.guided_velocity(v_c, 1.0, 0.0), v_c)


def test_memory_guidance_changes_the_shots_that_have_a_memory():
  system, params, enc = checkpoints.load_for_sampling(None)
  captions = ["a red round character moves left.", "the same first round character moves right."]
  shots = {}
  for g_m in (0.0, 1.5):
    gen = sampler.ShotGenerator(system, params, enc, steps=3, shift=3.0, guidance=3.0, memory_guidance=g_m)
    first, _ = gen(captions[0], [], seed=0)
    second, _ = gen(captions[1], [first], seed=1)
    shots[g_m] = (first, second)
  np.testing.assert_array_equal(shots[0.0][0], shots[1.5][0])  # the first shot has no memory to guide by
  assert float(np.max(np.abs(shots[0.0][1] - shots[1.5][1]))) > 1e-3
  with pytest.raises(ValueError, match="--memory_guidance must be a finite number >= 0"):
    sampler.ShotGenerator(system, params, enc, steps=3, shift=3.0, guidance=3.0, memory_guidance=-1.0)


def test_the_compilation_cache_stores_an_entry_points_programs(tmp_path):
  cache = str(tmp_path / "cache")
  script = (
      "from onestory_jax import compilation_cache; print(compilation_cache.enable()); import jax, jax.numpy as jnp;"
      " jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()"
  )
  run = lambda env: subprocess.run(  # noqa: E731
      [sys.executable, "-c", script],
      cwd=ROOT,
      env=dict(os.environ, PYTHONPATH=ROOT, **env),
      capture_output=True,
      text=True,
      timeout=300,
      check=True,
  )
  assert run({"JAX_COMPILATION_CACHE_DIR": cache}).stdout.strip() == cache
  assert [f for f in os.listdir(cache) if f.startswith("jit__lambda")]
  # Default: the user's cache directory; an empty JAX_COMPILATION_CACHE_DIR turns it off.
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  done = subprocess.run(
      [sys.executable, "-c", script],
      cwd=ROOT,
      env=dict(env, PYTHONPATH=ROOT, XDG_CACHE_HOME=str(tmp_path / "xdg")),
      capture_output=True,
      text=True,
      timeout=300,
      check=True,
  )
  assert done.stdout.strip() == os.path.join(str(tmp_path / "xdg"), "onestory_jax", "jax")
  assert os.listdir(done.stdout.strip())
  assert run({"JAX_COMPILATION_CACHE_DIR": ""}).stdout.strip() == "None"
  assert compilation_cache.default_dir().endswith(os.path.join("onestory_jax", "jax"))
