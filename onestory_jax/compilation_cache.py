"""JAX's persistent compilation cache, on by default for the entry points (``train``, ``sample``, ``memory_ablation``).

A second run with the same shapes loads its compiled programs from disk instead of compiling them again: on this
2-core CPU the first shot of a demo story costs about 10 s of compilation in a fresh process, and a few tenths of a
second with the cache warm (README, "Sampling speed"). XLA keys each entry by the program, the compile options and
the JAX/XLA version and device, so a stale entry is never used.

Where: ``$JAX_COMPILATION_CACHE_DIR`` when set (JAX's own variable; set it empty to turn the cache off), else
``$XDG_CACHE_HOME/onestory_jax/jax`` (``~/.cache/onestory_jax/jax``). Programs that compile in under a second are
not stored (JAX's ``jax_persistent_cache_min_compile_time_secs``).
"""

from __future__ import annotations

import os

import jax

ENV = "JAX_COMPILATION_CACHE_DIR"


def default_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "onestory_jax", "jax")


def enable() -> str | None:
  """Turns the cache on (module docstring) and returns its directory; None when ``$JAX_COMPILATION_CACHE_DIR`` is
  set empty."""
  directory = os.environ.get(ENV, default_dir())
  if not directory:
    return None
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return directory
