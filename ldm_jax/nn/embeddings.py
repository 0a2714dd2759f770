"""Sinusoidal timestep embedding, as in the LDM / diffusers reference."""

import math

import jax
import jax.numpy as jnp


def timestep_embedding(t_B: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Embeds (possibly fractional) timesteps as ``[cos, sin]`` features.

  Frequencies are ``max_period ** (-i / (dim // 2))``; an odd ``dim`` gets a
  trailing zero column. Always float32: the caller casts.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t_B, jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb
