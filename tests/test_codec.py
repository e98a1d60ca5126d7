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
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda z: codec.decode(None, z))(latents)),
                                np.asarray(video))


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
  np.testing.assert_array_equal(np.asarray(mask), np.broadcast_to(
      expected[:, :, None, None, :], (2, 2, 3, 2, 4)))
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
  with pytest.raises(ValueError,
                     match=r"video must be \[B, T, H, W, 3\], got shape \(2, 8, 8, 3\)"):
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
  with pytest.raises(ValueError, match=r"config.codec.name: unknown codec 'wan_vea'; "
                                       r"available: space_to_depth"):
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
