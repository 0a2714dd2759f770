"""Ancestral DDPM sampling (Ho et al. 2020), as LDM's ``p_sample`` and diffusers' ``DDPMScheduler``.

Each step draws from the posterior ``q(x_{t'} | x_t, x0_pred)`` between
consecutive grid points: with ``a``, ``a'`` their alpha_bars and
``beta = 1 - a / a'``, the mean is ``sqrt(a') beta / (1 - a) x0 +
sqrt(a / a') (1 - a') / (1 - a) x_t`` and the variance is
``fixed_small = (1 - a') / (1 - a) beta`` (clamped at 1e-20) or
``fixed_large = beta``. With all T steps these are the reference's
``posterior_mean_coef1/2`` and ``posterior_variance``.

The chain ends at ``alpha_bar = 1`` and, as LDM's ``nonzero_mask``, the last
step adds no noise (diffusers adds ``sqrt(beta)`` noise there for
``fixed_large`` when the last timestep is not 0).
"""

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.samplers.base import (
  Carry,
  Denoised,
  Sampler,
  StepTable,
  alpha_bars_of,
  next_alpha_bars,
  vp_table,
)
from ldm_jax.diffusion.schedules import DiffusionSchedule

DDPM_VARIANCES = ("fixed_small", "fixed_large")


class DDPMSampler(Sampler):
  draws_noise = True

  def table(self, schedule: DiffusionSchedule, timesteps: np.ndarray, eta) -> StepTable:
    del eta
    a = alpha_bars_of(schedule, timesteps)
    a_next = next_alpha_bars(schedule, timesteps, 1.0)
    alpha = a / a_next
    beta = 1.0 - alpha
    if self.config.ddpm_variance == "fixed_small":
      variance = jnp.maximum((1.0 - a_next) / (1.0 - a) * beta, 1e-20)
    else:
      variance = beta
    is_last = jnp.arange(len(timesteps)) == len(timesteps) - 1
    coefs = {
        "coef_x0": jnp.sqrt(a_next) * beta / (1.0 - a),
        "coef_xt": jnp.sqrt(alpha) * (1.0 - a_next) / (1.0 - a),
        "std": jnp.where(is_last, 0.0, jnp.sqrt(variance)),
    }
    return vp_table(timesteps, a, a_next, coefs)

  def update(self, carry: Carry, pred: Denoised, row: StepTable, noise: jax.Array | None) -> Carry:
    c = row.coefs
    mean = c["coef_x0"] * pred.x0 + c["coef_xt"] * carry["x"]
    return {"x": mean + c["std"] * noise}
