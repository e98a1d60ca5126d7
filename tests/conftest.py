"""Test setup: 8 simulated CPU devices (set before jax is imported), a persistent compilation cache of the run's own,
and parsed absl flags.

The compilation cache (:mod:`onestory_jax.compilation_cache`) lives in a fresh temporary directory for each run,
shared by the xdist workers and by the entry points that tests start, and removed at the end: tests build the same
small programs again and again (a resumed run and a straight run of one config, each in its own process), and
reading them back instead of compiling them cut the fault tests' time by about 40%. It never touches the user's
cache; ``JAX_COMPILATION_CACHE_DIR=`` (empty) turns it off, and a set directory is used as it is.

The suite's programs are small, and most of its time is spent compiling them, not running them: they are compiled
with cheaper CPU code generation (:data:`CHEAP_CODEGEN`: LLVM's optimisation level 0 and XLA's loop
emitters instead of its fusion emitters). XLA's HLO passes are unchanged, so are the programs; the machine code is
less optimised. The tiny train step (one DiT block) compiled in 4.7 s against 15.7 s and ran in 86 ms against 20 ms,
and the suite took 16.1 minutes against 23.4 (21.0 with the first flag alone). A set ``XLA_FLAGS`` is used as it is:
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` tests the default code generation.
"""

import os
import shutil
import sys
import tempfile

# Cheaper CPU code generation for the suite's small programs (above): the same HLO, compiled about 3x faster.
CHEAP_CODEGEN = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {CHEAP_CODEGEN}")
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
