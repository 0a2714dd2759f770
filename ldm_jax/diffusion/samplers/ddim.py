"""DDIM (Song et al. 2021), as LDM's ``DDIMSampler`` and diffusers' ``DDIMScheduler``.

``sigma_t = eta * sqrt((1 - a') / (1 - a) * (1 - a / a'))``; ``eta = 0`` is the
deterministic sampler and ``eta = 1`` has DDPM's posterior variance. After the
last step the chain lands on ``alpha_bar = 1`` (``set_alpha_to_one``) or on
``alpha_bar[0]`` (the LDM reference and SD's scheduler config).

One deliberate difference from diffusers: the step from ``t_i`` goes to the
next grid point ``t_{i+1}`` (as LDM does); diffusers' DDIM steps to
``t_i - T // N``, which is the same point for ``leading`` and ``trailing``
spacing whenever ``N`` divides ``T`` but not for ``linspace``.
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
    ddim_transfer,
    next_alpha_bars,
    vp_table,
)
from ldm_jax.diffusion.schedules import DiffusionSchedule


def final_alpha_bar(schedule: DiffusionSchedule, set_alpha_to_one: bool) -> jax.Array:
  """Where DDIM-style chains end: 1, or ``alpha_bar[0]`` as the LDM reference."""
  return jnp.float32(1.0) if set_alpha_to_one else schedule.alphas_cumprod[0]


class DDIMSampler(Sampler):
  draws_noise = True  # only used when the (traced) eta is positive
  supports_eta = True

  def table(self, schedule: DiffusionSchedule, timesteps: np.ndarray, eta) -> StepTable:
    a = alpha_bars_of(schedule, timesteps)
    a_next = next_alpha_bars(schedule, timesteps, final_alpha_bar(schedule, self.config.set_alpha_to_one))
    sigma = jnp.asarray(eta, jnp.float32) * jnp.sqrt((1.0 - a_next) / (1.0 - a) * (1.0 - a / a_next))
    return vp_table(timesteps, a, a_next, {"alpha_bar_next": a_next, "sigma": sigma})

  def update(self, carry: Carry, pred: Denoised, row: StepTable, noise: jax.Array | None) -> Carry:
    c = row.coefs
    return {"x": ddim_transfer(pred.x0, pred.eps, c["alpha_bar_next"], c["sigma"], noise)}
