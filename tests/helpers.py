"""Shared test helpers."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
