"""Guidance by a differentiable function of the predicted x0 (the LDM paper's image-space guidance).

A ``guide_fn(guide_params, x0_pred) -> scalar`` scores the sampler's
prediction of the clean sample; its value is read as ``log p(y | x_t)``
evaluated at ``x0_pred(x_t)`` (the paper's Appendix C "universal" guiding,
Rombach et al. 2022: ``log p(y | T(D(z0(z_t))))``). Its gradient with respect
to the network input ``x_t`` -- through ``x0_pred`` and hence through the
network, and through whatever ``guide_fn`` applies first (the pipeline's
decoder) -- enters as in classifier guidance (Dhariwal & Nichol 2021, eq. 14):

  ``eps_hat = eps - s * sqrt(1 - alpha_bar_t) * grad_{x_t} guide_fn(x0_pred(x_t))``,

and ``x0_hat`` is the x0 that ``eps_hat`` implies at the same ``x_t``:
``x0_hat = x0 + s * (1 - alpha_bar_t) / sqrt(alpha_bar_t) * grad``. Every
sampler then steps with the pair ``(x0_hat, eps_hat)``.

``guide_fn`` returns one scalar for the whole batch: the sum of per-example
log-likelihoods, so each example's gradient is its own. Reading the score at
the point estimate ``x0_pred`` ignores the posterior spread of x0 given
``x_t``: at high noise the pull is stronger than the exact ``log p(y | x_t)``
would give (``tests/diffusion/test_image_guidance.py`` measures this on
Gaussian data, where both are known in closed form).
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

# guide_fn(guide_params, x0_pred) -> scalar log-likelihood (summed over the batch).
GuideFn = Callable[[Any, jax.Array], jax.Array]
# predict(x_t) -> (x0, eps): the (classifier-free guided) network prediction at x_t.
PredictFn = Callable[[jax.Array], tuple[jax.Array, jax.Array]]


def guidance_correction(grad: jax.Array, alpha_bar: jax.Array, strength: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(dx0, deps)`` that a log-likelihood gradient ``grad`` (w.r.t. ``x_t``) adds to the prediction."""
  dx0 = strength * (1.0 - alpha_bar) / jnp.sqrt(alpha_bar) * grad
  deps = -strength * jnp.sqrt(1.0 - alpha_bar) * grad
  return dx0, deps


def image_guided_prediction(
    predict: PredictFn,
    x_t: jax.Array,
    alpha_bar: jax.Array,
    guide_fn: GuideFn,
    guide_params: Any,
    strength: jax.Array | float,
) -> tuple[jax.Array, jax.Array]:
  """``(x0_hat, eps_hat)`` at ``x_t``, guided by ``strength * grad log p``.

  A run-time ``strength == 0`` takes a ``lax.cond`` branch that evaluates the
  network once, without the backward pass, and returns its prediction
  unchanged (bit for bit what the unguided sampler computes).
  """
  strength = jnp.asarray(strength, jnp.float32)

  def plain(_):
    return predict(x_t)

  def guided(_):
    def objective(x):
      x0, eps = predict(x)
      value = guide_fn(guide_params, x0)
      if jnp.ndim(value) != 0:
        raise ValueError(f"guide_fn must return a scalar (sum over the batch), got shape {jnp.shape(value)}")
      return jnp.asarray(value, jnp.float32), (x0, eps)

    grad, (x0, eps) = jax.grad(objective, has_aux=True)(x_t)
    dx0, deps = guidance_correction(grad.astype(jnp.float32), alpha_bar, strength)
    return x0 + dx0, eps + deps

  return jax.lax.cond(strength == 0.0, plain, guided, None)
