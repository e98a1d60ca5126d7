"""Shared test helpers."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def xla_flags(devices: int | None = None) -> str:
  """``XLA_FLAGS`` for a process that a test starts: this run's flags (conftest.py: its code generation), with
  ``devices`` simulated CPU devices instead of the run's count (None: the one CPU device that a user has)."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
  return " ".join(flags + ([f"{DEVICE_COUNT_FLAG}={devices}"] if devices else []))


def load_config(variant: str = "tiny", **overrides):
  spec = importlib.util.spec_from_file_location("onestory_config", os.path.join(ROOT, "configs", "onestory.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config(variant)
  for key, value in overrides.items():
    node = config
    parts = key.split(".")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = value
  return config


# A tiny diffusers WanTransformer3DModel (2 layers, 2 heads of 16, FFN 64, timestep features 16): the sizes that the
# DiT parity tests and the published-weights smoke test build their references with; callers add the channels.
TINY_WAN_DIT = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    freq_dim=16,
    ffn_dim=64,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
)
