"""onestory_jax: OneStory (arXiv 2512.07802) in JAX/Flax.

``from onestory_jax import OneStoryPipeline`` is the Python API (:mod:`onestory_jax.pipeline`); it is imported on
first use, so that ``import onestory_jax`` stays light. TensorFlow (used only by clu's metric writers and
tensorflow-datasets) is imported without its C++ start-up lines (:func:`onestory_jax.logs.quiet_tensorflow_startup`).
"""

from onestory_jax import logs as _logs

__version__ = "0.1.0"
__all__ = ["OneStoryPipeline", "GeneratedStory"]
_logs.quiet_tensorflow_startup()


def __getattr__(name):
  if name in __all__:
    from onestory_jax import pipeline  # pylint: disable=g-import-not-at-top

    return getattr(pipeline, name)
  raise AttributeError(f"module 'onestory_jax' has no attribute {name!r}")
