"""Post-processing of predicted x0 inside samplers: static clipping and Imagen's dynamic thresholding."""

import jax
import jax.numpy as jnp


def clip_x0(x0: jax.Array, limit: float) -> jax.Array:
  """Clips x0 to ``[-limit, limit]`` (pixel-space DDPM's ``clip_denoised``)."""
  return jnp.clip(x0, -limit, limit)


def dynamic_threshold(x0: jax.Array, percentile: float, max_value: float = 1.0) -> jax.Array:
  """Imagen's dynamic thresholding, per example.

  ``s`` is the ``percentile`` quantile of ``|x0|`` over all non-batch axes,
  clamped to ``[1, max_value]``; x0 is clipped to ``[-s, s]`` and divided by
  ``s`` (with ``s = 1`` this is plain clipping to [-1, 1]), as diffusers does.
  """
  flat = jnp.abs(x0.reshape(x0.shape[0], -1))
  s = jnp.clip(jnp.quantile(flat, percentile, axis=1), 1.0, max_value)
  s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
  return jnp.clip(x0, -s, s) / s
