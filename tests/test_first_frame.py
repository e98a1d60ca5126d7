"""How a start image enters shot 1 (I2MSV), per backbone: Wan2.1-I2V's channels, Wan2.2-TI2V's given first latent
frame at timestep 0, and a text-to-video backbone's clear refusal."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onestory_jax import next_shot
from onestory_jax import objective
from onestory_jax import pipeline
from onestory_jax import rectified_flow as rf
from onestory_jax.models import codec as codec_lib
from tests.helpers import load_config


def _system(first_frame):
  overrides = {"model.first_frame": first_frame}
  if first_frame != "channels":
    overrides.update({"model.i2v": False, "conditioner.image_condition": "none"})
  system = next_shot.make_system(load_config("tiny", **overrides))
  params = jax.device_get(system.init_params(jax.random.key(0)))
  # Away from the initialisation (zero output projections), so that every input can change the output.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])
  return system, params, system.encoder_params(jax.random.key(1))


def _image(system, seed=0):
  d = system.config.data
  return np.random.default_rng(seed).integers(0, 256, (d.height, d.width, 3), dtype=np.uint8)


def _condition(system, params, enc, present):
  d = system.config.data
  tokens = system.tokenizer.encode(["a red round character moves left in a blue place, wide view."])
  f, h, w, c = system.latent_shape
  memory = jnp.zeros((1, 4, h, w, c))
  image = codec_lib.to_unit(jnp.asarray(_image(system)))[None]
  return system.condition(
      params, enc, tokens, memory, jnp.zeros((1, 4), bool), start_image=image, start_present=jnp.array([present])
  )


def test_ti2v_gives_the_first_latent_frame_at_timestep_zero():
  system, params, enc = _system("latent")
  cond = _condition(system, params, enc, True)
  given = np.asarray(system.given_frames(cond))
  assert given.tolist() == [[1.0] + [0.0] * (system.latent_shape[0] - 1)]
  x = jax.random.normal(jax.random.key(2), (1,) + system.latent_shape)
  t = jnp.array([0.7])
  v = system.velocity(params, cond, x, t)
  # The given frame's noise does not matter: the DiT sees the start image's latent there.
  v2 = system.velocity(params, cond, x.at[:, 0].add(5.0), t)
  np.testing.assert_allclose(np.asarray(v[:, 1:]), np.asarray(v2[:, 1:]), rtol=1e-5, atol=1e-6)
  # Without a start image nothing is given: the frame's noise matters, as in text-to-video.
  plain = _condition(system, params, enc, False)
  assert not np.asarray(system.given_frames(plain)).any()
  v3 = system.velocity(params, plain, x.at[:, 0].add(5.0), t)
  assert not np.allclose(np.asarray(v3[:, 1:]), np.asarray(system.velocity(params, plain, x, t)[:, 1:]))
  # The first frame is pinned to the start image's latent, and so is every sampled shot's.
  pinned = system.pin_given_frames(cond, x)
  np.testing.assert_array_equal(np.asarray(pinned[:, 1:]), np.asarray(x[:, 1:]))
  np.testing.assert_array_equal(
      np.asarray(pinned[0, 0]), np.asarray(cond.channels[0, 0, ..., system.codec.mask_channels :])
  )
  pipe = pipeline.OneStoryPipeline(system, params, enc, steps=2, shift=1.0, guidance=2.0)
  story = pipe.generate(["a red round character moves left in a blue place, wide view."], start_image=_image(system))
  np.testing.assert_allclose(story.shots[0].latents[0], np.asarray(pinned[0, 0]), rtol=1e-6, atol=1e-6)


def test_ti2v_training_leaves_the_given_frame_out_of_the_loss():
  system, params, enc = _system("latent")
  x0 = jax.random.normal(jax.random.key(0), (2,) + system.latent_shape)
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  v = jax.random.normal(jax.random.key(2), x0.shape)
  mask = jnp.array([[0.0] + [1.0] * (x0.shape[1] - 1)] * 2)
  full = rf.flow_loss(v, x0, noise, None, mask)
  assert float(full) == pytest.approx(float(rf.flow_loss(v[:, 1:], x0[:, 1:], noise[:, 1:])), rel=1e-6)
  assert float(rf.flow_loss(v.at[:, 0].add(100.0), x0, noise, None, mask)) == pytest.approx(float(full), rel=1e-6)


def test_a_text_to_video_backbone_refuses_a_start_image():
  system, params, enc = _system("none")
  pipe = pipeline.OneStoryPipeline(system, params, enc, steps=1)
  with pytest.raises(ValueError, match=r"start_image: the tiny backbone generates from text only"):
    pipe.story(start_image=_image(system))
  with pytest.raises(ValueError, match="config.model.first_frame must be one of"):
    next_shot.make_system(load_config("tiny", **{"model.first_frame": "latent"}))  # i2v=True takes channels
