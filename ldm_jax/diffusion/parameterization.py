"""Forward process and conversions between eps / x0 / v model outputs.

With ``a = alpha_bar_t``: ``x_t = sqrt(a) x0 + sqrt(1 - a) eps`` and
``v = sqrt(a) eps - sqrt(1 - a) x0`` (Salimans & Ho; SD v2). Every function
takes ``alpha_bar`` broadcastable to ``x_t`` so the same code serves
integer timesteps (table look-ups) and interpolated sigma-space levels.
"""

from typing import Literal

import jax
import jax.numpy as jnp

from ldm_jax.diffusion.schedules import DiffusionSchedule

PredictionType = Literal["eps", "x0", "v"]
PREDICTION_TYPES = ("eps", "x0", "v")
# diffusers' names for the same three parameterisations.
_ALIASES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}


def canonical_prediction_type(name: str) -> str:
  """``"eps" | "x0" | "v"``; also accepts diffusers' ``epsilon``, ``sample``, ``v_prediction``."""
  canonical = _ALIASES.get(name, name)
  if canonical not in PREDICTION_TYPES:
    raise ValueError(
        f"unknown prediction_type {name!r}; expected one of {PREDICTION_TYPES} "
        f"(or diffusers' {tuple(_ALIASES)})"
    )
  return canonical


def per_example(values_B: jax.Array, ndim: int) -> jax.Array:
  """Reshapes a ``(B,)`` vector to ``(B, 1, ..., 1)`` with ``ndim`` axes."""
  return jnp.reshape(values_B, values_B.shape + (1,) * (ndim - values_B.ndim))


def alpha_bar_at(schedule: DiffusionSchedule, t_B: jax.Array, ndim: int) -> jax.Array:
  """``alpha_bar[t]`` for integer timesteps, shaped to broadcast against an ``ndim`` array."""
  return per_example(schedule.alphas_cumprod[jnp.asarray(t_B, jnp.int32)], ndim)


def q_sample(schedule: DiffusionSchedule, x0: jax.Array, t_B: jax.Array, noise: jax.Array) -> jax.Array:
  """Samples ``x_t ~ q(x_t | x_0)`` for integer timesteps ``t_B``."""
  t_B = jnp.asarray(t_B, jnp.int32)
  scale = per_example(schedule.sqrt_alphas_cumprod[t_B], x0.ndim)
  noise_scale = per_example(schedule.sqrt_one_minus_alphas_cumprod[t_B], x0.ndim)
  return scale * x0.astype(jnp.float32) + noise_scale * noise.astype(jnp.float32)


def velocity(x0: jax.Array, eps: jax.Array, alpha_bar: jax.Array) -> jax.Array:
  """The v target ``sqrt(a) eps - sqrt(1 - a) x0``."""
  return jnp.sqrt(alpha_bar) * eps - jnp.sqrt(1.0 - alpha_bar) * x0


def predict_x0(output: jax.Array, x_t: jax.Array, alpha_bar: jax.Array, prediction_type: str) -> jax.Array:
  """The x0 implied by a model ``output`` of the given type at noise level ``alpha_bar``."""
  output = output.astype(jnp.float32)
  if prediction_type == "eps":
    return (x_t - jnp.sqrt(1.0 - alpha_bar) * output) / jnp.sqrt(alpha_bar)
  if prediction_type == "x0":
    return output
  if prediction_type == "v":
    return jnp.sqrt(alpha_bar) * x_t - jnp.sqrt(1.0 - alpha_bar) * output
  raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def predict_eps(output: jax.Array, x_t: jax.Array, alpha_bar: jax.Array, prediction_type: str) -> jax.Array:
  """The eps implied by a model ``output`` of the given type at noise level ``alpha_bar``."""
  output = output.astype(jnp.float32)
  if prediction_type == "eps":
    return output
  if prediction_type == "x0":
    return (x_t - jnp.sqrt(alpha_bar) * output) / jnp.sqrt(1.0 - alpha_bar)
  if prediction_type == "v":
    return jnp.sqrt(alpha_bar) * output + jnp.sqrt(1.0 - alpha_bar) * x_t
  raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def training_target(x0: jax.Array, noise: jax.Array, alpha_bar: jax.Array, prediction_type: str) -> jax.Array:
  """What a model of this parameterisation is trained to output."""
  if prediction_type == "eps":
    return noise.astype(jnp.float32)
  if prediction_type == "x0":
    return x0.astype(jnp.float32)
  if prediction_type == "v":
    return velocity(x0.astype(jnp.float32), noise.astype(jnp.float32), alpha_bar)
  raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
