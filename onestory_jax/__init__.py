"""onestory_jax: OneStory (arXiv 2512.07802) in JAX/Flax."""

__version__ = "0.1.0"
