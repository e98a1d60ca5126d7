"""onestory_jax: OneStory (arXiv 2512.07802) in JAX/Flax.

``from onestory_jax import OneStoryPipeline`` is the Python API (:mod:`onestory_jax.pipeline`); it is imported on
first use, so that ``import onestory_jax`` stays light.
"""

__version__ = "0.1.0"
__all__ = ["OneStoryPipeline", "GeneratedStory"]


def __getattr__(name):
  if name in __all__:
    from onestory_jax import pipeline  # pylint: disable=g-import-not-at-top

    return getattr(pipeline, name)
  raise AttributeError(f"module 'onestory_jax' has no attribute {name!r}")
