"""Layer helpers shared by the model modules (the Wan ports in :mod:`onestory_jax.models.wan` and OneStory's own).

Each returns a stock Flax layer whose parameters carry logical partitioning names, so they shard under the rules
of :mod:`onestory_jax.sharding`. The layer's name is the caller's, and the parameter leaves are Flax's (``kernel``
/ ``bias``, ``scale`` / ``bias``), so the converters' weight maps and saved checkpoints see the same tree whoever
builds it.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any


def dense(
    features: int,
    axes: tuple[str | None, str | None],
    name: str,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    kernel_init: Any = nn.initializers.xavier_uniform(),
) -> nn.Dense:
  """``nn.Dense`` with a biased output: kernel ``[in, features]`` partitioned as ``axes``, bias as ``axes[1]``.

  The kernel starts from ``kernel_init`` (Xavier-uniform unless given), the bias from zeros.
  """
  return nn.Dense(
      features,
      name=name,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(kernel_init, axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
  )


def layer_norm(
    eps: float,
    *,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    affine: bool = True,
    axis: str | None = "embed",
    name: str | None = None,
) -> nn.LayerNorm:
  """``torch.nn.LayerNorm`` over the last axis: two-pass statistics, computed in ``dtype`` (default float32).

  With ``affine`` the layer has a ``scale`` (ones) and a ``bias`` (zeros), both partitioned as ``axis``; without,
  it has no parameters (diffusers' ``FP32LayerNorm(elementwise_affine=False)``).
  """
  return nn.LayerNorm(
      epsilon=eps,
      dtype=dtype,
      param_dtype=param_dtype,
      use_bias=affine,
      use_scale=affine,
      use_fast_variance=False,
      name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (axis,)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axis,)),
  )
