"""Tests for the codec (models/codec.py) and image encoder (models/image_encoder.py)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import onestory
from onestory_jax.models import codec as codec_lib
from onestory_jax.models import image_encoder as image_lib


def _video(shape, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def test_round_trip_is_exact_and_shapes_match():
  codec = codec_lib.SpaceToDepthCodec(stride=(2, 4, 4))
  video = _video((2, 8, 16, 24, 3))
  latents = codec.encode(codec.init(jax.random.key(0)), video)
  assert latents.shape == (2, 4, 4, 6, 96)
  assert codec.latent_shape(8, 16, 24) == (4, 4, 6, 96)
  assert codec.latent_channels == 96 and codec.mask_channels == 2
  assert codec.video_shape(4, 4, 6) == (8, 16, 24)
  np.testing.assert_array_equal(np.asarray(codec.decode(None, latents)), video)


def test_latent_layout_groups_blocks_into_channels():
  codec = codec_lib.SpaceToDepthCodec(stride=(2, 2, 2))
  video = _video((1, 4, 4, 6, 3), seed=1)
  latents = np.asarray(codec.encode({}, video))
  # Latent cell (f, y, x), channel index (pt, ph, pw, c) == pixel (2f+pt, 2y+ph, 2x+pw, c).
  f, y, x, pt, ph, pw, c = 1, 1, 2, 1, 0, 1, 2
  channel = ((pt * 2 + ph) * 2 + pw) * 3 + c
  assert latents[0, f, y, x, channel] == video[0, 2 * f + pt, 2 * y + ph, 2 * x + pw, c]


def test_encode_decode_under_jit_and_bfloat16():
  codec = codec_lib.SpaceToDepthCodec(stride=(2, 4, 4))
  video = jnp.asarray(_video((1, 2, 8, 8, 3))).astype(jnp.bfloat16)
  latents = jax.jit(lambda v: codec.encode(None, v))(video)
  assert latents.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda z: codec.decode(None, z))(latents)), np.asarray(video))


def test_frame_mask_layout():
  codec = codec_lib.SpaceToDepthCodec(stride=(4, 4, 4))
  pixel_mask = np.zeros((2, 8), np.float32)
  pixel_mask[0, 0] = 1  # I2V: only the first frame given
  pixel_mask[1, 5] = 1
  mask = codec.frame_mask(pixel_mask, latent_hw=(3, 2))
  assert mask.shape == (2, 2, 3, 2, 4) and mask.dtype == jnp.float32
  expected = np.zeros((2, 2, 4), np.float32)
  expected[0, 0, 0] = 1  # latent frame 0, channel 0 = pixel frame 0
  expected[1, 1, 1] = 1  # pixel frame 5 = latent frame 1, channel 1
  np.testing.assert_array_equal(np.asarray(mask), np.broadcast_to(expected[:, :, None, None, :], (2, 2, 3, 2, 4)))
  compact = codec.frame_mask(pixel_mask)
  assert compact.shape == (2, 2, 1, 1, 4)
  np.testing.assert_array_equal(np.asarray(compact[:, :, 0, 0]), expected)


def test_frame_mask_matches_mask_of_encoded_video():
  # The mask of a frame is the space-to-depth grouping of frames onto channels: encoding a
  # video whose frame t is constant pixel_mask[t] gives the mask on every rgb/pixel channel.
  codec = codec_lib.SpaceToDepthCodec(stride=(2, 2, 2))
  pixel_mask = np.array([[1, 0, 0, 1]], np.float32)
  video = np.broadcast_to(pixel_mask[:, :, None, None, None], (1, 4, 4, 4, 3))
  latents = np.asarray(codec.encode(None, video)).reshape(1, 2, 2, 2, 2, 2, 2, 3)
  mask = np.asarray(codec.frame_mask(pixel_mask, latent_hw=(2, 2)))
  np.testing.assert_array_equal(latents[..., :, 0, 0, 0], mask)


@pytest.mark.parametrize("shape", [(1, 3, 8, 8, 3), (1, 2, 6, 8, 3), (1, 2, 8, 10, 3)])
def test_indivisible_shapes_raise(shape):
  codec = codec_lib.SpaceToDepthCodec(stride=(2, 4, 4))
  with pytest.raises(ValueError, match=r"\(T, H, W\) = .* divisible by the stride .*\(2, 4, 4\)"):
    codec.encode(None, np.zeros(shape, np.float32))


def test_bad_inputs_raise():
  codec = codec_lib.SpaceToDepthCodec(stride=(2, 4, 4))
  with pytest.raises(ValueError, match=r"video must be \[B, T, H, W, 3\], got shape \(2, 8, 8, 3\)"):
    codec.encode(None, np.zeros((2, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match=r"latents must be \[B, F, h, w, 96\]"):
    codec.decode(None, np.zeros((1, 1, 2, 2, 95), np.float32))
  with pytest.raises(ValueError, match=r"pixel_mask frames T = 3 .* stride t = 2"):
    codec.frame_mask(np.zeros((1, 3)))
  with pytest.raises(ValueError, match=r"pixel_mask must be \[B, T\]"):
    codec.frame_mask(np.zeros((4,)))
  with pytest.raises(ValueError, match=r"stride must be three positive ints"):
    codec_lib.SpaceToDepthCodec(stride=(2, 0, 4))


def test_make_codec_from_config_and_unknown_name():
  config = onestory.get_config("demo")
  codec = codec_lib.make_codec(config)
  assert isinstance(codec, codec_lib.SpaceToDepthCodec)
  assert codec.stride == tuple(config.codec.stride)
  assert codec.latent_shape(8, 32, 32) == (4, 8, 8, 96)
  bad = ml_collections.ConfigDict({"codec": {"name": "wan_vea", "stride": (4, 8, 8)}})
  with pytest.raises(ValueError, match=r"config.codec.name: unknown codec 'wan_vea'; " r"available: space_to_depth"):
    codec_lib.make_codec(bad)


def test_unit_uint8_conversions():
  u = np.arange(256, dtype=np.uint8)
  x = codec_lib.to_unit(u)
  assert x.dtype == np.float32 and isinstance(x, np.ndarray)
  assert x[0] == -1.0 and x[255] == 1.0
  np.testing.assert_array_equal(codec_lib.to_uint8(x), u)
  via_jax = codec_lib.to_uint8(codec_lib.to_unit(jnp.asarray(u)))
  assert isinstance(via_jax, jax.Array)
  np.testing.assert_array_equal(np.asarray(via_jax), u)
  clipped = codec_lib.to_uint8(np.array([-3.0, 0.0, 0.999, 5.0], np.float32))
  np.testing.assert_array_equal(clipped, [0, 128, 255, 255])  # 127.5 rounds half to even
  with pytest.raises(ValueError, match="to_unit: expected a uint8 array, got dtype float32"):
    codec_lib.to_unit(np.zeros(3, np.float32))
  with pytest.raises(ValueError, match="to_uint8: expected a float array"):
    codec_lib.to_uint8(np.zeros(3, np.int32))


# ------------------------------------------------------------------------- image encoder
def test_patch_image_encoder_shapes_and_lossless():
  enc = image_lib.PatchImageEncoder(patch=4)
  images = _video((2, 8, 12, 3))
  tokens = enc.encode(enc.init(jax.random.key(0)), images)
  assert tokens.shape == (2, 6, 48)
  assert enc.num_tokens(8, 12) == 6 and enc.token_dim(8, 12) == 48
  # Token 4 = patch row 1, column 1; feature (ph, pw, c).
  np.testing.assert_array_equal(np.asarray(tokens[1, 4]).reshape(4, 4, 3), images[1, 4:8, 4:8])
  np.testing.assert_array_equal(np.asarray(enc.decode(tokens, 8, 12)), images)


def test_image_encoder_from_config_and_errors():
  config = onestory.get_config("demo")
  enc = image_lib.make_image_encoder(config)
  assert enc.patch == config.image_encoder.patch == 8
  assert image_lib.num_image_tokens(config, 32, 32) == 16
  assert image_lib.image_dim(config, 32, 32) == 192
  with pytest.raises(ValueError, match=r"image \(H, W\) = \(30, 32\) .* patch size 8"):
    image_lib.num_image_tokens(config, 30, 32)
  with pytest.raises(ValueError, match=r"images must be \[B, H, W, 3\]"):
    enc.encode(None, np.zeros((1, 8, 8, 8, 3), np.float32))
  config.image_encoder.name = "clip"
  with pytest.raises(ValueError, match=r"unknown image encoder 'clip'; available: patches"):
    image_lib.make_image_encoder(config)


# ------------------------------------------------------------------------- Wan VAE codec
# Tiny Wan2.1-layout VAE (stride 4x8x8, 4 latent channels); its parity with diffusers is in test_parity_wan_vae.py.
_TINY_VAE = dict(
    base_dim=8,
    z_dim=4,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    latents_mean=[0.5, -0.25, 0.0, 1.0],
    latents_std=[2.0, 0.5, 1.0, 4.0],
)


def _wan_config(vae, **codec):
  return ml_collections.ConfigDict({"codec": dict(name="wan_vae", vae=vae, **codec)})


def test_wan_vae_codec_shapes_presets_and_errors():
  wan21 = codec_lib.make_codec(_wan_config("wan2.1", stride=(4, 8, 8)))
  assert isinstance(wan21, codec_lib.WanVAECodec)
  assert wan21.stride == (4, 8, 8) and wan21.latent_channels == 16 and wan21.mask_channels == 4
  assert wan21.latent_shape(81, 480, 832) == (21, 60, 104, 16)  # the paper setting
  assert wan21.video_shape(21, 60, 104) == (81, 480, 832)
  assert wan21.latent_shape(1, 8, 8) == (1, 1, 1, 16)
  wan22 = codec_lib.make_codec(_wan_config("wan2.2"))
  assert wan22.stride == (4, 16, 16) and wan22.latent_channels == 48
  assert wan22.latent_shape(81, 704, 1280) == (21, 44, 80, 48)
  assert wan22.video_shape(21, 44, 80) == (81, 704, 1280)
  with pytest.raises(ValueError, match=r"\(T, H, W\) = \(80, 480, 832\) needs T = 1 \+ 4k frames"):
    wan21.latent_shape(80, 480, 832)
  with pytest.raises(ValueError, match=r"\(T, H, W\) = \(81, 480, 840\) .* spatial stride 16"):
    wan22.latent_shape(81, 480, 840)
  with pytest.raises(ValueError, match=r"video must be \[B, T, H, W, 3\], got shape \(5, 8, 8, 3\)"):
    wan21.encode({}, np.zeros((5, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match=r"latents must be \[B, F, h, w, 16\]"):
    wan21.decode({}, np.zeros((1, 2, 1, 1, 48), np.float32))
  with pytest.raises(ValueError, match=r"config.codec.stride = \(2, 4, 4\) does not match .* \(4, 8, 8\)"):
    codec_lib.make_codec(_wan_config("wan2.1", stride=(2, 4, 4)))
  with pytest.raises(ValueError, match=r"config.codec.vae: unknown preset 'wan2.3'; available: wan2.1, wan2.2"):
    codec_lib.make_codec(_wan_config("wan2.3"))
  with pytest.raises(ValueError, match=r"WanVAECodec.dtype: expected 'float32' or 'bfloat16', got 'float16'"):
    codec_lib.make_codec(_wan_config("wan2.1", dtype="float16"))


def test_wan_vae_codec_frame_mask_follows_wan_i2v_layout():
  # Wan2.1-I2V: the mask of pixel frame 0 is repeated 4 times, then frames are grouped 4 per latent frame, so
  # latent frame 0 carries frame 0 on all channels and channel c of latent frame f >= 1 is frame 4 (f - 1) + 1 + c.
  codec = codec_lib.WanVAECodec()
  pixel_mask = np.zeros((3, 9), np.float32)
  pixel_mask[0, 0] = 1  # I2V: the start image
  pixel_mask[1, 6] = 1  # latent frame 2, channel 1
  pixel_mask[2, 1] = 1  # latent frame 1, channel 0
  mask = codec.frame_mask(pixel_mask, latent_hw=(3, 2))
  assert mask.shape == (3, 3, 3, 2, 4) and mask.dtype == jnp.float32
  expected = np.zeros((3, 3, 4), np.float32)
  expected[0, 0, :] = 1
  expected[1, 2, 1] = 1
  expected[2, 1, 0] = 1
  np.testing.assert_array_equal(np.asarray(mask), np.broadcast_to(expected[:, :, None, None], mask.shape))
  assert codec.frame_mask(pixel_mask).shape == (3, 3, 1, 1, 4)
  with pytest.raises(ValueError, match=r"pixel_mask frames T = 8 must be 1 \+ 4k"):
    codec.frame_mask(np.zeros((1, 8)))
  with pytest.raises(ValueError, match=r"pixel_mask must be \[B, T\]"):
    codec.frame_mask(np.zeros((9,)))


def test_wan_vae_codec_encodes_normalised_latents_and_plugs_into_the_system():
  from onestory_jax import next_shot  # pylint: disable=g-import-not-at-top

  config = onestory.get_config("demo")
  config.codec = ml_collections.ConfigDict(dict(name="wan_vae", vae=_TINY_VAE, stride=(4, 8, 8)))
  config.data.frames_per_shot, config.data.height, config.data.width = 5, 16, 16
  system = next_shot.make_system(config)
  codec = system.codec
  assert system.latent_shape == (2, 2, 2, 4)
  enc = system.encoder_params(jax.random.key(0))
  params = enc["codec"]
  once, again, other = (codec.init(jax.random.key(k)) for k in (3, 3, 4))
  assert jax.tree.structure(once) == jax.tree.structure(params)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), once, again))
  assert not jnp.array_equal(once["encoder"]["conv_in"]["kernel"], other["encoder"]["conv_in"]["kernel"])

  frames = np.random.default_rng(0).integers(0, 256, (1, 5, 16, 16, 3), dtype=np.uint8)
  latents = system.encode_shots(enc, jnp.asarray(frames))
  assert latents.shape == (1, 2, 2, 2, 4) and latents.dtype == jnp.float32
  raw = codec.encode_raw(params, codec_lib.to_unit(frames))
  mean, std = np.array(_TINY_VAE["latents_mean"]), np.array(_TINY_VAE["latents_std"])
  np.testing.assert_allclose(np.asarray(latents), (np.asarray(raw) - mean) / std, rtol=1e-6, atol=1e-6)

  video = system.decode_shots(enc, latents)
  assert video.shape == (1, 5, 16, 16, 3) and video.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(video))) <= 1.0
  np.testing.assert_allclose(np.asarray(video), np.asarray(codec.decode_raw(params, raw)), atol=1e-5)

  # I2V channel path: [4 mask channels, latent of (first frame, zeros...)].
  first = jnp.asarray(codec_lib.to_unit(frames[:, 0]))
  channels = system.first_frame_channels(enc, first, jnp.array([True]))
  assert channels.shape == (1, 2, 2, 2, 8)
  np.testing.assert_array_equal(
      np.asarray(channels[..., :4]), np.asarray(codec.frame_mask(np.array([[1, 0, 0, 0, 0]]), (2, 2)))
  )
  video0 = jnp.zeros((1, 5, 16, 16, 3)).at[:, 0].set(first)
  np.testing.assert_allclose(np.asarray(channels[..., 4:]), np.asarray(codec.encode(params, video0)), atol=1e-6)
