"""The sampling driver: every sampler is one jitted program, a ``lax.scan`` over its iterations.

Static (a new value compiles a new program): ``denoise_fn``, ``guide_fn``, the
``SamplerConfig``, the img2img start step (from ``strength``), shapes, and
whether ``uncond`` / ``init_latent`` / ``mask`` are given. Traced (no
recompilation): params, the initial noise, rng, conditioning, guidance scale,
eta, the schedule's values, the init latent, the mask, ``guide_params`` and
``guidance_strength``.
"""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct

from ldm_jax.diffusion.config import SamplerConfig
from ldm_jax.diffusion.guidance import DenoiseFn, guided_output
from ldm_jax.diffusion.image_guidance import GuideFn, image_guided_prediction
from ldm_jax.diffusion.parameterization import predict_eps, predict_x0
from ldm_jax.diffusion.samplers import Denoised, Sampler, StepTable
from ldm_jax.diffusion.samplers.base import Carry
from ldm_jax.diffusion.schedules import DiffusionSchedule
from ldm_jax.diffusion.validation import check_sample_inputs


@struct.dataclass
class Plan:
  """Everything a run needs besides the network: the step table and how to start."""

  table: StepTable
  init_noise_sigma: jax.Array  # text-to-image: state_0 = x_T * init_noise_sigma
  start_scale: jax.Array  # img2img: state_0 = start_scale * init_latent + start_noise * x_T
  start_noise: jax.Array


def first_step(num_steps: int, strength: float | None) -> int:
  """Index of the first grid step an img2img run takes (diffusers' ``get_timesteps``)."""
  if strength is None:
    return 0
  return num_steps - min(int(num_steps * strength), num_steps)


def make_plan(schedule: DiffusionSchedule, config: SamplerConfig, eta: Any = 0.0, start: int = 0) -> Plan:
  """The ``Plan`` of ``config`` from grid step ``start`` on (traceable: the schedule may be traced)."""
  sampler = config.make_sampler()
  grid = sampler.timesteps(schedule.num_timesteps)[start:]
  if grid.size == 0:
    raise ValueError(f"start={start} leaves no steps of the {config.num_steps}-step grid")
  table = sampler.table(schedule, grid, eta)
  # Inpainting writes the exact known latent after the last iteration.
  table = table.replace(keep_scale=table.keep_scale.at[-1].set(1.0), keep_noise=table.keep_noise.at[-1].set(0.0))
  start_scale, start_noise = sampler.start_level(schedule, grid)
  return Plan(table, sampler.init_noise_sigma(schedule, grid), start_scale, start_noise)


def step_noise(rng: jax.Array, k: jax.Array | int, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """The Gaussian noise of iteration ``k``: ``(sampler noise, inpainting noise)``."""
  sampler_key, known_key = jax.random.split(jax.random.fold_in(rng, k))
  return jax.random.normal(sampler_key, shape, jnp.float32), jax.random.normal(known_key, shape, jnp.float32)


def blend_known(x: jax.Array, known: jax.Array, mask: jax.Array, scale, noise_scale, noise: jax.Array) -> jax.Array:
  """Where ``mask`` is 1, replaces ``x`` by ``known`` noised to ``(scale, noise_scale)``."""
  return mask * (scale * known + noise_scale * noise) + (1.0 - mask) * x


def initial_state(plan: Plan, x_T: jax.Array, init_latent: jax.Array | None, mask: jax.Array | None,
                  from_init: bool) -> jax.Array:
  """The state before the first iteration: pure noise, or ``init_latent`` noised (img2img).

  With a mask, the kept region starts as ``init_latent`` noised to the first level with ``x_T``.
  """
  x_T = x_T.astype(jnp.float32)
  x = plan.start_scale * init_latent + plan.start_noise * x_T if from_init else x_T * plan.init_noise_sigma
  if mask is not None:
    x = blend_known(x, init_latent, mask, plan.start_scale, plan.start_noise, x_T)
  return x


def make_iteration(
    sampler: Sampler,
    denoise_fn: DenoiseFn,
    params: Any,
    *,
    rng: jax.Array,
    cond: Any = None,
    uncond: Any = None,
    guidance_scale: Any = 1.0,
    known: jax.Array | None = None,
    mask: jax.Array | None = None,
    guide_fn: GuideFn | None = None,
    guide_params: Any = None,
    guidance_strength: Any = 0.0,
) -> Callable[[Carry, StepTable, Any], Carry]:
  """The scan body ``(carry, row, k) -> carry``: one network evaluation and one sampler update
  (with ``guide_fn``, also its gradient: see ``ldm_jax.diffusion.image_guidance``)."""
  prediction_type = sampler.config.prediction_type
  interval = sampler.config.guidance_interval

  def step_scale(t_model):
    if interval is None:
      return guidance_scale
    # 1 outside the interval: guided_output then runs the conditional pass alone.
    return jnp.where((t_model >= interval[0]) & (t_model <= interval[1]), guidance_scale, 1.0)

  def iteration(carry: Carry, row: StepTable, k) -> Carry:
    x = carry["x"]
    x_in = x * row.in_scale
    t_B = jnp.full((x.shape[0],), row.t_model, jnp.float32)

    def predict(x_t):
      out = guided_output(denoise_fn, params, x_t, t_B, cond, uncond, step_scale(row.t_model))
      if out.shape != x.shape:
        raise ValueError(f"denoise_fn returned shape {out.shape}, expected the input's shape {x.shape}")
      return predict_x0(out, x_t, row.alpha_bar, prediction_type), predict_eps(out, x_t, row.alpha_bar, prediction_type)

    if guide_fn is None:
      x0, eps = predict(x_in)
    else:
      x0, eps = image_guided_prediction(predict, x_in, row.alpha_bar, guide_fn, guide_params, guidance_strength)
    pred = Denoised(x0=sampler.process_x0(x0), eps=eps)
    noise, known_noise = step_noise(rng, k, x.shape) if (sampler.draws_noise or mask is not None) else (None, None)
    carry = sampler.update(carry, pred, row, noise)
    if mask is not None:
      carry = {**carry, "x": blend_known(carry["x"], known, mask, row.keep_scale, row.keep_noise, known_noise)}
    return carry

  return iteration


@functools.partial(jax.jit, static_argnames=("denoise_fn", "config", "start", "from_init", "guide_fn"))
def _sample_program(denoise_fn, config, start, from_init, params, x_T, schedule, rng, cond, uncond,
                    guidance_scale, eta, init_latent, mask, guide_fn=None, guide_params=None, guidance_strength=0.0):
  sampler = config.make_sampler()
  plan = make_plan(schedule, config, eta, start)
  x = initial_state(plan, x_T, init_latent, mask, from_init)
  iteration = make_iteration(sampler, denoise_fn, params, rng=rng, cond=cond, uncond=uncond,
                             guidance_scale=guidance_scale, known=init_latent, mask=mask, guide_fn=guide_fn,
                             guide_params=guide_params, guidance_strength=guidance_strength)

  def body(carry, row_and_k):
    return iteration(carry, *row_and_k), None

  iterations = jnp.arange(plan.table.t_model.shape[0])
  carry, _ = jax.lax.scan(body, sampler.init_carry(x), (plan.table, iterations))
  return carry["x"]


def sample(
    denoise_fn: DenoiseFn,
    params: Any,
    x_T: jax.Array,
    schedule: DiffusionSchedule,
    config: SamplerConfig,
    *,
    rng: jax.Array,
    cond: Any = None,
    uncond: Any = None,
    guidance_scale: Any = 1.0,
    eta: Any = 0.0,
    init_latent: jax.Array | None = None,
    strength: float | None = None,
    mask: jax.Array | None = None,
    guide_fn: GuideFn | None = None,
    guide_params: Any = None,
    guidance_strength: Any = 0.0,
) -> jax.Array:
  """Draws samples (float32, ``x_T``'s shape) by running ``config``'s sampler from noise ``x_T``.

  Args:
    denoise_fn: ``denoise_fn(params, x_t, t_B, cond) -> output`` (eps, x0 or v as
      ``config.prediction_type``); ``t_B`` is float32 ``(B,)``, fractional for
      Euler samplers on a ``linspace`` grid. Pass the same function object each
      call: it is part of the compilation key.
    params: network parameters (any pytree).
    x_T: unit Gaussian noise, ``(B, ...)``; may be batch-sharded.
    schedule: the training ``DiffusionSchedule``.
    config: static sampler settings.
    rng: key for the noise that stochastic samplers and inpainting draw.
    cond: conditioning pytree given to ``denoise_fn``.
    uncond: unconditional (or negative-prompt) pytree shaped like ``cond``;
      enables classifier-free guidance in one batched call on ``[uncond; cond]``.
    guidance_scale: scalar ``s`` of ``out_u + s (out_c - out_u)``; at 1 only the
      conditional pass runs.
    eta: DDIM's noise level (0: deterministic).
    init_latent: latent to start from (img2img) or to keep (inpainting).
    strength: img2img strength in [0, 1]: the run takes the last
      ``int(num_steps * strength)`` steps of the grid, starting from
      ``init_latent`` noised to the first of them (diffusers' semantics); 0
      returns ``init_latent`` unchanged. None starts from pure noise.
    mask: inpainting mask broadcastable to ``x_T``: **1 keeps** ``init_latent``,
      0 is generated (the LDM samplers' convention; diffusers' inpainting
      pipelines use the opposite). After every step the kept region is replaced
      by ``init_latent`` noised to the current level; after the last step it
      equals ``init_latent`` exactly.
    guide_fn: ``guide_fn(guide_params, x0_pred) -> scalar``, a differentiable
      log-likelihood of the predicted x0 (summed over the batch) whose gradient
      w.r.t. ``x_t`` steers every step:
      ``eps_hat = eps - guidance_strength * sqrt(1 - alpha_bar_t) * grad``
      (``ldm_jax.diffusion.image_guidance``). Static, like ``denoise_fn``.
    guide_params: traced pytree handed to ``guide_fn`` (targets, weights).
    guidance_strength: scalar ``s`` above; 0 samples exactly what the run
      without ``guide_fn`` samples.
  """
  check_sample_inputs(config, x_T, schedule, cond, uncond, guidance_scale, eta, init_latent, strength, mask)
  if guide_fn is None and guide_params is not None:
    raise ValueError("guide_params was given without guide_fn (image-space guidance needs both)")
  if jnp.ndim(guidance_strength) != 0:
    raise ValueError(f"guidance_strength must be a scalar, got shape {jnp.shape(guidance_strength)}")
  start = first_step(config.num_steps, strength)
  if start == config.num_steps:  # strength too small to take any step
    return jnp.asarray(init_latent, jnp.float32)
  if init_latent is not None:
    init_latent = jnp.asarray(init_latent, jnp.float32)
  if mask is not None:
    mask = jnp.asarray(mask, jnp.float32)
  return _sample_program(denoise_fn, config, start, strength is not None, params, x_T, schedule, rng, cond,
                         uncond, jnp.asarray(guidance_scale, jnp.float32), jnp.asarray(eta, jnp.float32),
                         init_latent, mask, guide_fn=guide_fn, guide_params=guide_params,
                         guidance_strength=jnp.asarray(guidance_strength, jnp.float32))
