"""Test setup: 8 simulated CPU devices (set before jax is imported), a persistent compilation cache of the run's own,
and parsed absl flags.

The compilation cache (:mod:`onestory_jax.compilation_cache`) lives in a fresh temporary directory for each run,
shared by the xdist workers and by the entry points that tests start, and removed at the end: tests build the same
small programs again and again (a resumed run and a straight run of one config, each in its own process), and
reading them back instead of compiling them cut the fault tests' time by about 40%. It never touches the user's
cache; ``JAX_COMPILATION_CACHE_DIR=`` (empty) turns it off, and a set directory is used as it is.
"""

import os
import shutil
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags  # noqa: E402
import pytest  # noqa: E402

if not flags.FLAGS.is_parsed():
  flags.FLAGS(sys.argv[:1], known_only=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

_CACHE = "JAX_COMPILATION_CACHE_DIR"
_OWNER = pytest.StashKey[bool]()


def pytest_configure(config):
  # The controller (or a run without xdist) makes the run's cache; xdist workers inherit the variable.
  if _CACHE not in os.environ:
    os.environ[_CACHE] = tempfile.mkdtemp(prefix="onestory_jax_test_jax_cache_")
    config.stash[_OWNER] = True
  if os.environ[_CACHE]:
    from onestory_jax import compilation_cache  # pylint: disable=g-import-not-at-top

    compilation_cache.enable()


def pytest_unconfigure(config):
  if config.stash.get(_OWNER, False):
    shutil.rmtree(os.environ.pop(_CACHE), ignore_errors=True)
