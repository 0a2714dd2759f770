"""Exact denoisers for data whose posterior is known in closed form: ground truth for samplers.

For ``x0 ~ N(mu, S)`` and ``x_t = sqrt(a) x0 + sqrt(1 - a) eps``, with
``C = a S + (1 - a) I``: ``E[eps | x_t] = sqrt(1 - a) C^-1 (x_t - sqrt(a) mu)``;
for a mixture of isotropic Gaussians it is the responsibility-weighted sum.

Denoisers follow the driver's ``denoise_fn(params, x_t, t_B, cond)`` contract;
``params["sigmas"]`` is the schedule's sigma table, interpolated at
fractional ``t`` as the Euler samplers do; ``cond`` (optional, ``(B, d)``)
shifts the data mean, which makes guidance testable.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.parameterization import velocity
from ldm_jax.diffusion.schedules import interpolate_sigma


def gaussian_params(mean: np.ndarray, cov: np.ndarray, sigmas: jax.Array) -> dict[str, jax.Array]:
  """Denoiser params of ``N(mean, cov)`` data: mean and the eigendecomposition of ``cov``."""
  eigvals, eigvecs = np.linalg.eigh(np.asarray(cov, np.float64))
  return {
      "mean": jnp.asarray(mean, jnp.float32),
      "eigvals": jnp.asarray(eigvals, jnp.float32),
      "eigvecs": jnp.asarray(eigvecs, jnp.float32),
      "sigmas": jnp.asarray(sigmas, jnp.float32),
  }


def _alpha_bar_at(sigmas: jax.Array, t_B: jax.Array) -> jax.Array:
  return (1.0 / (1.0 + interpolate_sigma(sigmas, t_B) ** 2))[:, None]


def _output(x0: jax.Array, eps: jax.Array, alpha_bar: jax.Array, prediction_type: str) -> jax.Array:
  if prediction_type == "eps":
    return eps
  if prediction_type == "x0":
    return x0
  return velocity(x0, eps, alpha_bar)


def gaussian_posterior(x_BxD: jax.Array, alpha_bar: jax.Array, mean_BxD: jax.Array, params):
  """``(E[x0 | x_t], E[eps | x_t])`` for Gaussian data (``alpha_bar`` broadcastable to ``(B, 1)``)."""
  u = params["eigvecs"]
  z = (x_BxD - jnp.sqrt(alpha_bar) * mean_BxD) @ u
  whitened = z / (alpha_bar * params["eigvals"] + (1.0 - alpha_bar))  # C^-1 (x_t - sqrt(a) mu), eigenbasis
  x0 = mean_BxD + jnp.sqrt(alpha_bar) * (whitened * params["eigvals"]) @ u.T
  eps = jnp.sqrt(1.0 - alpha_bar) * whitened @ u.T
  return x0, eps


@functools.cache
def gaussian_denoiser(prediction_type: str):
  """The exact ``denoise_fn`` of Gaussian data, outputting eps, x0 or v (one object per type)."""

  def denoise(params, x_t, t_B, cond):
    x = x_t.reshape(x_t.shape[0], -1).astype(jnp.float32)
    alpha_bar = _alpha_bar_at(params["sigmas"], t_B)
    mean = params["mean"] if cond is None else params["mean"] + cond
    x0, eps = gaussian_posterior(x, alpha_bar, jnp.broadcast_to(mean, x.shape), params)
    return _output(x0, eps, alpha_bar, prediction_type).reshape(x_t.shape)

  return denoise


def mixture_params(weights, means, stds, sigmas) -> dict[str, jax.Array]:
  """Denoiser params of a mixture of isotropic Gaussians ``sum_k w_k N(means_k, stds_k^2 I)``."""
  return {
      "log_weights": jnp.log(jnp.asarray(weights, jnp.float32)),
      "means": jnp.asarray(means, jnp.float32),
      "stds": jnp.asarray(stds, jnp.float32),
      "sigmas": jnp.asarray(sigmas, jnp.float32),
  }


@functools.cache
def mixture_denoiser(prediction_type: str):
  """The exact ``denoise_fn`` of an isotropic Gaussian mixture (``cond`` is ignored)."""

  def denoise(params, x_t, t_B, cond):
    del cond
    x = x_t.reshape(x_t.shape[0], -1).astype(jnp.float32)
    alpha_bar = _alpha_bar_at(params["sigmas"], t_B)  # (B, 1)
    means, var0 = params["means"], params["stds"] ** 2  # (K, D), (K,)
    marginal_var = alpha_bar * var0 + (1.0 - alpha_bar)  # (B, K)
    residual = x[:, None, :] - jnp.sqrt(alpha_bar)[:, :, None] * means  # (B, K, D)
    log_lik = -0.5 * jnp.sum(residual**2, -1) / marginal_var - 0.5 * x.shape[1] * jnp.log(marginal_var)
    resp = jax.nn.softmax(params["log_weights"] + log_lik, axis=-1)  # (B, K)
    whitened = residual / marginal_var[:, :, None]
    x0_k = means + (jnp.sqrt(alpha_bar) * var0)[:, :, None] * whitened
    eps_k = jnp.sqrt(1.0 - alpha_bar)[:, :, None] * whitened
    x0, eps = jnp.sum(resp[:, :, None] * x0_k, axis=1), jnp.sum(resp[:, :, None] * eps_k, axis=1)
    return _output(x0, eps, alpha_bar, prediction_type).reshape(x_t.shape)

  return denoise
