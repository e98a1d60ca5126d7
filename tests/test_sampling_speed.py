"""What makes sampling fast keeps its results: classifier-free guidance in one batched DiT call gives the two
velocities that two calls give, and the persistent compilation cache stores the programs of an entry point's run."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from onestory_jax import checkpoints
from onestory_jax import compilation_cache
from tests.helpers import ROOT


def test_the_guidance_pair_gives_both_velocities_in_one_call():
  system, params, enc = checkpoints.load_for_sampling(None)
  f, h, w, c = system.latent_shape
  rng = np.random.default_rng(0)
  memory = jnp.asarray(rng.normal(size=(2, 2 * f, h, w, c)), jnp.float32)
  mask = jnp.asarray([[True] * (2 * f), [True] * f + [False] * f])
  tokens = system.tokenizer.encode(["a red round character moves left.", "the same first round character."])
  d = system.config.data
  image = jnp.zeros((2, d.height, d.width, 3), jnp.float32)
  cond = system.condition(params, enc, tokens, memory, mask, start_image=image, start_present=jnp.zeros((2,), bool))
  x = jnp.asarray(rng.normal(size=(2, f, h, w, c)), jnp.float32)
  t = jnp.asarray([0.3, 0.8], jnp.float32)

  pair = cond.guidance_pair()
  assert pair.text.shape[0] == 4 and pair.context["mask"].shape[0] == 4
  both = system.velocity(params, pair, jnp.concatenate([x, x]), jnp.concatenate([t, t]))
  with_caption = system.velocity(params, cond, x, t)
  without = system.velocity(params, cond.replace(text=cond.null_text), x, t)
  np.testing.assert_allclose(both[:2], with_caption, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(both[2:], without, atol=1e-5, rtol=1e-5)
  assert float(jnp.max(jnp.abs(with_caption - without))) > 1e-3  # the caption matters: the halves are not one


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
