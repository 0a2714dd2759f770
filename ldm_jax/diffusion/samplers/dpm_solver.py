"""DPM-Solver++ 2M (Lu et al. 2022), as diffusers' ``DPMSolverMultistepScheduler``
(``algorithm_type="dpmsolver++"``, ``solver_order=2``, ``solver_type="midpoint"``,
``lower_order_final=True``, ``final_sigmas_type="zero"``).

In data-prediction form with ``alpha = sqrt(a)``, ``sigma = sqrt(1 - a)``,
``lambda = log(alpha / sigma)`` and ``h = lambda' - lambda``:

  ``x' = (sigma' / sigma) x + alpha' (1 - e^{-h}) D``,

with ``D = x0`` (first order: the first step, and the last step, which lands
on sigma = 0 and so returns the x0 prediction) or, in between,
``D = x0 + (x0 - x0_prev) / (2 r)``, ``r = h_prev / h``.
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


class DPMSolverPP2MSampler(Sampler):
  grid_kind = "dpm_solver"

  def table(self, schedule: DiffusionSchedule, timesteps: np.ndarray, eta) -> StepTable:
    del eta
    a = alpha_bars_of(schedule, timesteps)
    a_next = next_alpha_bars(schedule, timesteps, 1.0)
    # Karras sigma = e^{-lambda}; its ratio is e^{-h} and stays finite when the next sigma is 0.
    k, k_next = jnp.sqrt((1.0 - a) / a), jnp.sqrt((1.0 - a_next) / a_next)
    h = jnp.log(k) - jnp.log(k_next)  # +inf on the last step, which is first order anyway
    r = jnp.concatenate([jnp.ones((1,), jnp.float32), h[:-1] / h[1:]])
    index = jnp.arange(len(timesteps))
    second_order = (index > 0) & (index < len(timesteps) - 1)
    half_inv_r = jnp.where(second_order, 0.5 / jnp.where(second_order, r, 1.0), 0.0)
    coefs = {
        "coef_x": jnp.sqrt(1.0 - a_next) / jnp.sqrt(1.0 - a),
        "coef_d": jnp.sqrt(a_next) * (1.0 - k_next / k),
        "weight_now": 1.0 + half_inv_r,
        "weight_prev": -half_inv_r,
    }
    return vp_table(timesteps, a, a_next, coefs)

  def init_carry(self, x: jax.Array) -> Carry:
    return {"x": x, "prev_x0": jnp.zeros_like(x)}

  def update(self, carry: Carry, pred: Denoised, row: StepTable, noise: jax.Array | None) -> Carry:
    c = row.coefs
    d = c["weight_now"] * pred.x0 + c["weight_prev"] * carry["prev_x0"]
    return {"x": c["coef_x"] * carry["x"] + c["coef_d"] * d, "prev_x0": pred.x0}
