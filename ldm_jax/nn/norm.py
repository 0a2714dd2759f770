"""Normalisation layers that always compute in float32.

The reference implementations upcast GroupNorm to float32 (``GroupNorm32``);
doing the same for every norm keeps bfloat16 training stable and makes
float32 parity exact. Both layers use the two-pass variance, like PyTorch.
"""

import flax.linen as nn
import jax.numpy as jnp


class GroupNorm(nn.GroupNorm):
  """GroupNorm(32) computed in float32, returned in the input's dtype."""

  num_groups: int = 32
  use_fast_variance: bool = False
  dtype: jnp.dtype = jnp.float32

  def __call__(self, x, *args, **kwargs):
    return super().__call__(x.astype(jnp.float32), *args, **kwargs).astype(x.dtype)


class LayerNorm(nn.LayerNorm):
  """LayerNorm computed in float32, returned in the input's dtype."""

  epsilon: float = 1e-5
  use_fast_variance: bool = False
  dtype: jnp.dtype = jnp.float32

  def __call__(self, x, *args, **kwargs):
    return super().__call__(x.astype(jnp.float32), *args, **kwargs).astype(x.dtype)
