"""Diffusion core: schedules, parameterisations, training loss, guidance and samplers.

Knows nothing of UNets: samplers take any ``denoise_fn(params, x_t, t_B, cond)``.
"""

from ldm_jax.diffusion.config import SamplerConfig
from ldm_jax.diffusion.driver import initial_state, make_iteration, make_plan, sample, step_noise
from ldm_jax.diffusion.guidance import cfg_combine, guided_output
from ldm_jax.diffusion.losses import diffusion_loss, loss_by_timestep_bucket, min_snr_weight, sample_timesteps
from ldm_jax.diffusion.parameterization import predict_eps, predict_x0, q_sample, training_target, velocity
from ldm_jax.diffusion.samplers import SAMPLERS
from ldm_jax.diffusion.schedules import (
    DiffusionSchedule,
    make_beta_schedule,
    make_schedule,
    schedule_name_from_diffusers,
)
from ldm_jax.diffusion.thresholding import clip_x0, dynamic_threshold
from ldm_jax.diffusion.timesteps import inference_timesteps

__all__ = [
    "SAMPLERS",
    "DiffusionSchedule",
    "SamplerConfig",
    "cfg_combine",
    "clip_x0",
    "diffusion_loss",
    "dynamic_threshold",
    "guided_output",
    "inference_timesteps",
    "initial_state",
    "loss_by_timestep_bucket",
    "make_beta_schedule",
    "make_iteration",
    "make_plan",
    "make_schedule",
    "min_snr_weight",
    "predict_eps",
    "predict_x0",
    "q_sample",
    "sample",
    "sample_timesteps",
    "schedule_name_from_diffusers",
    "step_noise",
    "training_target",
    "velocity",
]
