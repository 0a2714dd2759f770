"""Classifier-free guidance: ``out = out_u + s * (out_c - out_u)`` in one batched network call.

Guidance is applied to the raw model output (eps, x0 or v alike: the
conversions between them are linear in the output, so the result is the
same), as the LDM / SD v2 samplers do.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp

# denoise_fn(params, x_t, t_B, cond) -> model output with x_t's shape.
DenoiseFn = Callable[[Any, jax.Array, jax.Array, Any], jax.Array]


def cfg_combine(out_uncond: jax.Array, out_cond: jax.Array, scale: jax.Array | float) -> jax.Array:
  """The guidance combination ``out_u + scale * (out_c - out_u)``."""
  return out_uncond + scale * (out_cond - out_uncond)


def check_uncond_matches(cond: Any, uncond: Any) -> None:
  """Raises if ``uncond`` cannot be stacked under ``cond`` leaf by leaf."""
  cond_def, uncond_def = jax.tree.structure(cond), jax.tree.structure(uncond)
  if cond_def != uncond_def:
    raise ValueError(f"uncond must have the same pytree structure as cond: {uncond_def} vs {cond_def}")
  for c, u in zip(jax.tree.leaves(cond), jax.tree.leaves(uncond)):
    if jnp.shape(c) != jnp.shape(u):
      raise ValueError(f"uncond leaf shape {jnp.shape(u)} differs from cond leaf shape {jnp.shape(c)}")


def guided_output(
    denoise_fn: DenoiseFn,
    params: Any,
    x_t: jax.Array,
    t_B: jax.Array,
    cond: Any,
    uncond: Any = None,
    guidance_scale: jax.Array | float = 1.0,
) -> jax.Array:
  """Float32 model output, guided when ``uncond`` is given.

  The unconditional and conditional passes run as one call on the batch
  ``[uncond; cond]``. A run-time ``guidance_scale == 1`` takes a ``lax.cond``
  branch that evaluates the conditional pass only.
  """

  def conditional(_):
    return denoise_fn(params, x_t, t_B, cond).astype(jnp.float32)

  if uncond is None:
    return conditional(None)

  def guided(_):
    both = jax.tree.map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond, cond)
    x2, t2 = jnp.concatenate([x_t, x_t], axis=0), jnp.concatenate([t_B, t_B], axis=0)
    out_u, out_c = jnp.split(denoise_fn(params, x2, t2, both).astype(jnp.float32), 2, axis=0)
    return cfg_combine(out_u, out_c, guidance_scale)

  return jax.lax.cond(jnp.all(guidance_scale == 1.0), conditional, guided, None)
