"""PLMS (Liu et al. 2022): LDM's ``PLMSSampler`` = diffusers' ``PNDMScheduler(skip_prk_steps=True)``.

Both run N + 1 network evaluations for N steps (N >= 2):

- evaluation 0 at ``(x_0, t_0)`` gives ``e_0``; a DDIM step with it gives a
  provisional ``x_1``;
- evaluation 1 at the provisional ``x_1`` gives ``e'``; the real ``x_1`` is a
  DDIM step from ``x_0`` with ``(e_0 + e') / 2`` (pseudo improved Euler);
- evaluation k >= 2 at ``(x_{k-1}, t_{k-1})`` gives ``e``, combined with the
  previous evaluations' eps by the 2nd / 3rd / 4th-order Adams-Bashforth
  weights ``(3, -1)/2``, ``(23, -16, 5)/12``, ``(55, -59, 37, -9)/24``.

diffusers' PNDM transfer formula is algebraically DDIM with eta = 0, which is
what is used here (so x0 clipping / thresholding apply as in LDM's PLMS). The
history holds eps: for v / x0 models we combine the eps they imply (diffusers
combines the raw v outputs instead). As in ``ddim.py``, steps end on the next
grid point (diffusers: ``t - T // N``; the same on ``leading`` / ``trailing``
grids when N divides T). With N = 1 there is one plain DDIM step, as
diffusers does.
"""

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.parameterization import predict_x0
from ldm_jax.diffusion.samplers.base import (
    Carry,
    Denoised,
    Sampler,
    StepTable,
    alpha_bars_of,
    ddim_transfer,
    next_alpha_bars,
)
from ldm_jax.diffusion.samplers.ddim import final_alpha_bar
from ldm_jax.diffusion.schedules import DiffusionSchedule

_ADAMS_BASHFORTH = {  # weights on (e_now, e_prev, e_prev2, e_prev3) by history length
    1: (1.5, -0.5, 0.0, 0.0),
    2: (23 / 12, -16 / 12, 5 / 12, 0.0),
    3: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}
_HISTORY = 3


def plms_iterations(num_steps: int) -> dict[str, np.ndarray]:
  """Static per-evaluation plan: grid point evaluated, step taken, eps weights and carry flags."""
  if num_steps == 1:
    eval_index = step_index = np.array([0])
    weights = [(1.0, 0.0, 0.0, 0.0)]
  else:
    eval_index = np.array([0, 1] + list(range(1, num_steps)))
    step_index = np.array([0, 0] + list(range(1, num_steps)))
    weights = [(1.0, 0.0, 0.0, 0.0), (0.5, 0.5, 0.0, 0.0)]
    weights += [_ADAMS_BASHFORTH[min(i, _HISTORY)] for i in range(1, num_steps)]
  k = np.arange(len(eval_index))
  correction = (k == 1) & (num_steps > 1)  # evaluation 1 redoes step 0 from the saved x_0
  return dict(
      eval_index=eval_index,
      step_index=step_index,
      weights=np.array(weights),
      from_saved=correction.astype(np.float32),
      push=(~correction).astype(np.float32),
      save=(k == 0).astype(np.float32),
  )


class PLMSSampler(Sampler):

  def table(self, schedule: DiffusionSchedule, timesteps: np.ndarray, eta) -> StepTable:
    del eta  # PLMS is deterministic (LDM raises for eta != 0; the driver does too)
    plan = plms_iterations(len(timesteps))
    a = alpha_bars_of(schedule, timesteps)
    a_next = next_alpha_bars(schedule, timesteps, final_alpha_bar(schedule, self.config.set_alpha_to_one))
    eval_a, from_a, to_a = a[plan["eval_index"]], a[plan["step_index"]], a_next[plan["step_index"]]
    weights = jnp.asarray(plan["weights"], jnp.float32)
    coefs = {
        "alpha_bar_from": from_a,
        "alpha_bar_to": to_a,
        "weights": weights,
        "from_saved": jnp.asarray(plan["from_saved"], jnp.float32),
        "push": jnp.asarray(plan["push"], jnp.float32),
        "save": jnp.asarray(plan["save"], jnp.float32),
    }
    return StepTable(
        t_model=jnp.asarray(timesteps[plan["eval_index"]], jnp.float32),
        in_scale=jnp.ones_like(eval_a),
        alpha_bar=eval_a,
        keep_scale=jnp.sqrt(to_a),
        keep_noise=jnp.sqrt(1.0 - to_a),
        coefs=coefs,
    )

  def init_carry(self, x: jax.Array) -> Carry:
    return {"x": x, "saved": x, "history": jnp.zeros((_HISTORY,) + x.shape, x.dtype)}

  def update(self, carry: Carry, pred: Denoised, row: StepTable, noise: jax.Array | None) -> Carry:
    c = row.coefs
    w, history = c["weights"], carry["history"]
    eps = w[0] * pred.eps + w[1] * history[0] + w[2] * history[1] + w[3] * history[2]
    source = jnp.where(c["from_saved"] > 0, carry["saved"], carry["x"])
    x0 = self.process_x0(predict_x0(eps, source, c["alpha_bar_from"], "eps"))
    pushed = jnp.concatenate([pred.eps[None], history[:-1]], axis=0)
    return {
        "x": ddim_transfer(x0, eps, c["alpha_bar_to"]),
        "saved": jnp.where(c["save"] > 0, carry["x"], carry["saved"]),
        "history": jnp.where(c["push"] > 0, pushed, history),
    }
