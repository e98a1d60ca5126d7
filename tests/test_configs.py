"""Config variants: the default is the paper's setting, and every variant builds its model abstractly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel

from onestory_jax import plan
from onestory_jax import sharding
from onestory_jax.models import adaptive_conditioner as ac
from tests.helpers import load_config


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _abstract_params(config):
  """OneStory's parameter tree for a config, as ShapeDtypeStructs (nothing is allocated)."""
  system = plan.planning_system(config)  # no tokenizer files needed
  params = jax.eval_shape(system.init_params, jax.random.key(0))
  return sharding.strip_boxes(params), system.latent_shape, system.model


def _diffusers_dit_count(**kw) -> int:
  """Parameters of diffusers' reference DiT, built on torch's meta device (nothing is allocated)."""
  with torch.device("meta"):
    ref = WanTransformer3DModel(**kw)
  return sum(p.numel() for p in ref.parameters())


def test_default_config_is_the_paper_setting_and_counts_wan21_i2v_14b():
  config = load_config(None)
  assert config.variant == "wan21_i2v_14b_480p"
  assert (config.data.height, config.data.width, config.data.frames_per_shot) == (480, 832, 81)
  assert config.conditioner.budget_frames == 1.0
  params, latent, model = _abstract_params(config)
  assert latent == (21, 60, 104, 16)  # Wan VAE stride (4, 8, 8), 16 channels
  assert model.budget == ac.budget_tokens((60, 104), (1, 2, 2), 1.0) == 1560  # one latent frame of tokens
  n_dit = _count(params["dit"])
  n_ref = _diffusers_dit_count(
      patch_size=(1, 2, 2),
      num_attention_heads=40,
      attention_head_dim=128,
      in_channels=36,
      out_channels=16,
      text_dim=4096,
      freq_dim=256,
      ffn_dim=13824,
      num_layers=40,
      cross_attn_norm=True,
      qk_norm="rms_norm_across_heads",
      eps=1e-6,
      image_dim=1280,
      added_kv_proj_dim=5120,
  )
  assert n_dit == n_ref  # Wan2.1-I2V-14B's transformer, parameter for parameter
  assert 16.0e9 < n_dit < 16.8e9
  n_new = _count(params["frame_selection"]) + _count(params["adaptive_conditioner"])
  assert 0.9e9 < n_new < 1.0e9  # Frame Selection at the DiT width (~0.95B) + the patchifiers (~7M)
  assert _count(params) == n_dit + n_new + _count(params["text_encoder"])
  assert set(params) == {"dit", "frame_selection", "adaptive_conditioner", "text_encoder"}


@pytest.mark.parametrize(
    "variant,dit_kw,latent",
    [
        (
            "wan21_t2v_1_3b",
            dict(
                num_attention_heads=12,
                attention_head_dim=128,
                in_channels=16,
                out_channels=16,
                ffn_dim=8960,
                num_layers=30,
            ),
            (21, 60, 104, 16),
        ),
        (
            "wan22_ti2v_5b",
            dict(
                num_attention_heads=24,
                attention_head_dim=128,
                in_channels=48,
                out_channels=48,
                ffn_dim=14336,
                num_layers=30,
            ),
            (31, 44, 80, 48),
        ),
    ],
)
def test_wan_variants_match_their_backbones(variant, dit_kw, latent):
  config = load_config(variant)
  params, lat, _ = _abstract_params(config)
  assert lat == latent
  n_ref = _diffusers_dit_count(
      patch_size=(1, 2, 2),
      text_dim=4096,
      freq_dim=256,
      cross_attn_norm=True,
      qk_norm="rms_norm_across_heads",
      eps=1e-6,
      **dit_kw,
  )
  assert _count(params["dit"]) == n_ref


def test_unknown_variant_is_named():
  with pytest.raises(ValueError, match="unknown variant 'wan3'"):
    load_config("wan3")
