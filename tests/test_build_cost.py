"""python -m onestory_jax.data.build_cost: the cost of building records, from the models' traced programs.

On a tiny Wan2.1-I2V config (a 32x32, 5-frame shot, a small VAE and umT5): every model call of a unit is counted
(``2n + (n - 1) A`` VAE passes, one umT5 call per caption, DINOv2 and CLIP per frame), the per-call FLOPs agree
with independent counts (the training-step FLOPs of onestory_jax.flops for the VAE, the transformer formula for
DINOv2), the bytes match the record layout, and --measure times every model.
"""

import math

import numpy as np
import pytest

from onestory_jax import chips
from onestory_jax import flops as flops_lib
from onestory_jax.data import build_cost
from onestory_jax.data.multishot import layout as layout_lib
from tests.helpers import load_config

VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])
UMT5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=64)
CLIP = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, patch_size=14, image_size=28)


def _config(**overrides):
  import ml_collections  # pylint: disable=g-import-not-at-top

  return load_config(
      "wan21_i2v_14b_480p",
      **{
          "codec": ml_collections.ConfigDict(dict(name="wan_vae", vae=dict(VAE), dtype="float32")),
          **{f"text_encoder.{k}": v for k, v in UMT5.items()},
          "text_encoder.dtype": "float32",
          "text_encoder.param_dtype": "float32",
          **{f"image_encoder.{k}": v for k, v in CLIP.items()},
          "data.height": 32,
          "data.width": 48,
          "data.frames_per_shot": 5,
          "data.text_len": 16,
          **overrides,
      },
  )


@pytest.fixture(scope="module")
def projection():
  config = _config()
  return config, build_cost.run(config, {2: 3, 3: 2}, augmentations=2, dinov2="small", chips=["h100", "v5p"], mfu=0.25)


def test_every_model_call_of_a_unit_is_counted(projection):
  _, out = projection
  per = out["flops_per_call"]
  assert all(per[k] > 0 for k in ("vae_encode_per_shot", "text_per_caption", "dinov2_per_frame", "clip_per_frame"))
  # 3 two-shot units: 2*2 + 1*2 = 6 VAE passes each; 2 three-shot units: 2*3 + 2*2 = 10.
  assert out["flops"]["vae_encode"] == pytest.approx((3 * 6 + 2 * 10) * per["vae_encode_per_shot"])
  assert out["flops"]["text"] == pytest.approx((3 * 2 + 2 * 3) * per["text_per_caption"])
  frames = (3 * 2 + 2 * 3) * 5
  assert out["flops"]["dinov2"] == pytest.approx(frames * per["dinov2_per_frame"])
  assert out["flops"]["clip"] == pytest.approx(frames * per["clip_per_frame"])
  total = sum(out["flops"][k] for k in ("vae_encode", "text", "dinov2", "clip"))
  assert out["flops"]["total"] == pytest.approx(total)
  assert 3 * out["flops_per_unit"]["2"] + 2 * out["flops_per_unit"]["3"] == pytest.approx(total)
  assert out["shots"] == 12
  h100 = out["accelerators"]["h100"]
  assert h100["chip_hours"] == pytest.approx(total / (chips.get("h100").peak_bf16_flops * 0.25) / 3600)
  assert h100["wall_hours_on_workers"] == pytest.approx(h100["chip_hours"] / 64)
  assert out["accelerators"]["v5p"]["chip_hours"] > h100["chip_hours"]  # a slower chip takes longer


def test_per_call_flops_agree_with_independent_counts(projection):
  config, out = projection
  per = out["flops_per_call"]
  # The training step's count of the same VAE: 3 triplet shots + the I2V first-frame video.
  assert per["vae_encode_per_shot"] == pytest.approx(flops_lib.frozen_encoder_flops(config)["codec_encode"] / 4)
  # DINOv2-small, ViT formula: a 32x48 frame -> short side 224, 224 x 336 -> 16 x 24 patches + CLS.
  assert out["shot"]["dinov2_input"] == [224, 336]
  d, layers, ffn, tokens = 384, 12, 4 * 384, 16 * 24 + 1
  per_layer = 8 * tokens * d * d + 4 * tokens * tokens * d + 4 * tokens * d * ffn
  patch_embed = 2 * (16 * 24) * (14 * 14 * 3) * d
  # The 16 x 16 position embeddings resized to 16 x 24 by two bicubic matrices (rows, then columns).
  interpolation = 2 * d * (16 * 16 * 16 + 16 * 16 * 24)
  assert per["dinov2_per_frame"] == pytest.approx(layers * per_layer + patch_embed + interpolation, rel=1e-9)
  # CLIP, the config's image encoder (28 x 28 crop: 2 x 2 patches + CLS), all 2 layers, the pooled CLS.
  d, f, tokens = 32, 64, 5
  per_layer = 8 * tokens * d * d + 4 * tokens * tokens * d + 4 * tokens * d * f
  assert per["clip_per_frame"] == pytest.approx(2 * per_layer + 2 * 4 * 14 * 14 * 3 * d, rel=1e-9)
  # umT5: the analytic count of onestory_jax.flops.
  assert per["text_per_caption"] == pytest.approx(flops_lib.text_encoder_flops(config), rel=1e-6)


def test_storage_follows_the_record_layout(projection):
  config, out = projection
  lay = layout_lib.RecordLayout.from_config(config)
  lat = int(np.prod(lay.latent_shape)) * 2  # float16
  frames = lay.latent_shape[0]
  img = frames * lay.image_size[0] * lay.image_size[1] * 3

  def unit(n, a=2):
    return (
        (n + (n - 1) * a + n) * lat  # latents, augmented latents, start latents
        + n * 16 * 4  # tokens
        + n * 16 * 32 * 2  # text embeddings
        + n * n * frames * 4  # sel_labels
        + (n + (n - 1) * a) * img  # images and augmented images
    )

  assert out["storage_bytes"] == 3 * unit(2) + 2 * unit(3)


def test_curation_lower_bound_is_the_kept_shots():
  config = _config()
  out = build_cost.run(config, {2: 10}, video_s_per_core_s=20.0)
  hours = 20 * 5 / 16 / 3600
  assert out["curation"]["source_hours"] == pytest.approx(hours)
  assert out["curation"]["source_hours_is_lower_bound"]
  assert out["curation"]["core_hours"] == pytest.approx(hours / 20.0)
  given = build_cost.run(config, {2: 10}, source_hours=100.0, video_s_per_core_s=25.0)
  assert not given["curation"]["source_hours_is_lower_bound"]
  assert given["curation"]["core_hours"] == pytest.approx(4.0)


def test_a_text_to_video_config_has_no_start_latents():
  config = _config()
  with config.unlocked():
    config.model.first_frame = "none"
  out = build_cost.run(config, {2: 1}, augmentations=0)
  assert out["flops"]["vae_encode"] == pytest.approx(2 * out["flops_per_call"]["vae_encode_per_shot"])


def test_measure_times_every_model():
  config = _config()
  out = build_cost.run(config, {2: 4}, dinov2="small", measure_frames=5, repeats=1)
  m = out["measured"]
  assert set(m["models"]) == {"vae_encode", "text_one_layer", "dinov2", "clip"}
  for name, v in m["models"].items():
    assert v["seconds"] > 0 and v["flops"] > 0, name
    assert v["flops_per_s"] == pytest.approx(v["flops"] / v["seconds"])
  # The whole build at the measured speeds, in core hours.
  rate = m["models"]["vae_encode"]["flops_per_s"]
  assert m["core_hours"]["vae_encode"] == pytest.approx(out["flops"]["vae_encode"] / rate * m["cores"] / 3600)
  assert m["shots_per_s_per_core"] == pytest.approx(8 / (m["core_hours_total"] * 3600))
  assert m["seconds_per_unit_on_this_machine"]["2"] * 4 == pytest.approx(m["core_hours_total"] * 3600 / m["cores"])
  assert math.isclose(m["core_hours_total"], sum(m["core_hours"].values()))


@pytest.mark.parametrize(
    "spec, message",
    [("2x5", "SHOTS:UNITS"), ("1:5", "at least 2 shots"), ("", "got nothing")],
)
def test_bad_units(spec, message):
  with pytest.raises(ValueError, match=message):
    build_cost.parse_units(spec)


def test_bad_settings():
  config = _config()
  with pytest.raises(ValueError, match="--mfu"):
    build_cost.run(config, {2: 1}, mfu=1.5)
  with pytest.raises(ValueError, match="--dinov2"):
    build_cost.run(config, {2: 1}, dinov2="huge")
  with pytest.raises(ValueError, match="WanVAECodec"):
    build_cost.run(config, {2: 1}, measure_frames=4)
