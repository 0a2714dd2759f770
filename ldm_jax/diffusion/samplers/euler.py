"""Euler and Euler-ancestral in sigma space, as diffusers' ``EulerDiscreteScheduler`` and
``EulerAncestralDiscreteScheduler`` (k-diffusion's ``sample_euler`` / ``sample_euler_ancestral``).

The state is the variance-exploding ``x = x_t / sqrt(a) = x0 + sigma * eps``
with ``sigma = sqrt((1 - a) / a)``, interpolated linearly at fractional
timesteps. The network sees ``x / sqrt(sigma^2 + 1)`` (= x_t) and the
fractional timestep. With ``d = (x - x0) / sigma``:

- Euler: ``x' = x + (sigma' - sigma) d``;
- ancestral: ``sigma_up = sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2)``,
  ``sigma_down = sqrt(sigma'^2 - sigma_up^2)``,
  ``x' = x + (sigma_down - sigma) d + sigma_up z``.

Text-to-image starts from ``z * sigma_max`` (``linspace`` / ``trailing``) or
``z * sqrt(sigma_max^2 + 1)`` (``leading``), exactly as diffusers'
``init_noise_sigma``; the last step lands on sigma = 0.
"""

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.samplers.base import Carry, Denoised, Sampler, StepTable
from ldm_jax.diffusion.schedules import DiffusionSchedule


class EulerSampler(Sampler):
  grid_kind = "sigma"
  ancestral = False

  def _sigmas(self, schedule: DiffusionSchedule, timesteps: np.ndarray) -> jax.Array:
    return schedule.sigma_at(jnp.asarray(timesteps, jnp.float32))

  def start_level(self, schedule: DiffusionSchedule, timesteps: np.ndarray) -> tuple[jax.Array, jax.Array]:
    return jnp.float32(1.0), self._sigmas(schedule, timesteps[:1])[0]

  def init_noise_sigma(self, schedule: DiffusionSchedule, timesteps: np.ndarray) -> jax.Array:
    sigma_max = self._sigmas(schedule, timesteps[:1])[0]
    return jnp.sqrt(sigma_max**2 + 1.0) if self.config.timestep_spacing == "leading" else sigma_max

  def table(self, schedule: DiffusionSchedule, timesteps: np.ndarray, eta) -> StepTable:
    del eta
    sigma = self._sigmas(schedule, timesteps)
    sigma_next = jnp.append(sigma[1:], 0.0)
    if self.ancestral:
      sigma_up = jnp.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
      sigma_down = jnp.sqrt(sigma_next**2 - sigma_up**2)
    else:
      sigma_up, sigma_down = jnp.zeros_like(sigma), sigma_next
    return StepTable(
        t_model=jnp.asarray(timesteps, jnp.float32),
        in_scale=1.0 / jnp.sqrt(sigma**2 + 1.0),
        alpha_bar=1.0 / (sigma**2 + 1.0),
        keep_scale=jnp.ones_like(sigma),
        keep_noise=sigma_next,
        coefs={"sigma": sigma, "sigma_down": sigma_down, "sigma_up": sigma_up},
    )

  def update(self, carry: Carry, pred: Denoised, row: StepTable, noise: jax.Array | None) -> Carry:
    c = row.coefs
    x = carry["x"]
    derivative = (x - pred.x0) / c["sigma"]
    x_next = x + (c["sigma_down"] - c["sigma"]) * derivative
    return {"x": x_next + c["sigma_up"] * noise if self.ancestral else x_next}


class EulerAncestralSampler(EulerSampler):
  ancestral = True
  draws_noise = True
