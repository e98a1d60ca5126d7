"""Test setup: 8 simulated CPU devices (set before jax is imported), no persistent compilation cache, and parsed absl
flags."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The entry points that tests start keep out of the user's persistent compilation cache (compilation_cache.py).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "")

from absl import flags  # noqa: E402

if not flags.FLAGS.is_parsed():
  flags.FLAGS(sys.argv[:1], known_only=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
