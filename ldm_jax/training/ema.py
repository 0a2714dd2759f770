"""Exponential moving average of parameters, with the reference warm-up."""

from typing import Any

import jax
import jax.numpy as jnp


def ema_decay(num_updates: jax.Array, decay: float = 0.9999, use_warmup: bool = True) -> jax.Array:
  """``min(decay, (1 + n) / (10 + n))`` for the n-th update (n counted from 1)."""
  n = jnp.asarray(num_updates, jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n)) if use_warmup else jnp.asarray(decay, jnp.float32)


def ema_update(ema: Any, params: Any, num_updates: jax.Array, decay: float = 0.9999, use_warmup: bool = True) -> Any:
  """``ema - (1 - d) * (ema - params)``, computed in float32."""
  d = ema_decay(num_updates, decay, use_warmup)
  return jax.tree.map(lambda e, p: (e - (1.0 - d) * (e - p.astype(e.dtype))).astype(e.dtype), ema, params)
