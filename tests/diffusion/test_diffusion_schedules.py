"""Beta schedules, schedule tables and inference timestep grids against closed forms and diffusers."""

import math

import numpy as np
import pytest

from ldm_jax.diffusion import (
    DiffusionSchedule,
    SamplerConfig,
    inference_timesteps,
    make_beta_schedule,
    make_schedule,
    schedule_name_from_diffusers,
)
from ldm_jax.diffusion.samplers.plms import plms_iterations

SD = dict(num_timesteps=1000, linear_start=0.00085, linear_end=0.012)


def test_linear_is_linear_in_sqrt_beta():
  betas = make_beta_schedule("linear", **SD)
  np.testing.assert_allclose(np.diff(np.sqrt(betas)), (math.sqrt(0.012) - math.sqrt(0.00085)) / 999, rtol=1e-9)
  np.testing.assert_allclose(betas[[0, -1]], [0.00085, 0.012], rtol=1e-12)
  assert betas.dtype == np.float64


def test_sqrt_linear_and_sqrt_closed_forms():
  sqrt_linear = make_beta_schedule("sqrt_linear", 50, 0.0015, 0.0195)
  np.testing.assert_allclose(sqrt_linear, 0.0015 + np.arange(50) * (0.018 / 49), rtol=1e-12)
  np.testing.assert_allclose(make_beta_schedule("sqrt", 50, 0.0015, 0.0195), np.sqrt(sqrt_linear), rtol=1e-12)


def test_cosine_matches_alpha_bar_ratio_and_clip():
  s, T = 8e-3, 1000
  f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
  expected = np.array([min(1 - f(t + 1) / f(t), 0.999) for t in range(T)])
  betas = make_beta_schedule("cosine", T)
  np.testing.assert_allclose(betas, expected, rtol=1e-9, atol=1e-15)
  assert betas[-1] == 0.999  # the reference clips the last betas


def test_aliases_and_diffusers_names():
  np.testing.assert_array_equal(make_beta_schedule("scaled_linear", **SD), make_beta_schedule("linear", **SD))
  np.testing.assert_array_equal(make_beta_schedule("squaredcos_cap_v2", 20), make_beta_schedule("cosine", 20))
  assert schedule_name_from_diffusers("scaled_linear") == "linear"
  assert schedule_name_from_diffusers("linear") == "sqrt_linear"
  assert schedule_name_from_diffusers("squaredcos_cap_v2") == "cosine"
  with pytest.raises(ValueError, match="sqrt_linear"):
    make_beta_schedule("quadratic")
  with pytest.raises(ValueError, match="scaled_linear"):
    schedule_name_from_diffusers("sigmoid")


@pytest.mark.parametrize("diffusers_name", ["scaled_linear", "linear", "squaredcos_cap_v2"])
def test_betas_match_diffusers(diffusers_name):
  pytest.importorskip("torch")
  from diffusers import DDPMScheduler

  ref = DDPMScheduler(1000, 0.00085, 0.012, beta_schedule=diffusers_name).betas.numpy()
  ours = make_beta_schedule(schedule_name_from_diffusers(diffusers_name), **SD)
  # diffusers computes in float32 (cosine in float64 then cast).
  np.testing.assert_allclose(ours, ref, rtol=2e-6, atol=1e-9)


def test_schedule_tables_match_float64_reference():
  betas = np.random.default_rng(0).uniform(1e-4, 0.05, size=300)
  sched = DiffusionSchedule.from_betas(betas)
  alphas = 1 - betas
  ab = np.cumprod(alphas)
  ab_prev = np.concatenate([[1.0], ab[:-1]])
  post_var = betas * (1 - ab_prev) / (1 - ab)
  expected = dict(
      alphas_cumprod=ab, alphas_cumprod_prev=ab_prev, sqrt_alphas_cumprod=np.sqrt(ab),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1 - ab), sqrt_recip_alphas_cumprod=1 / np.sqrt(ab),
      sqrt_recipm1_alphas_cumprod=np.sqrt(1 / ab - 1), posterior_variance=post_var,
      posterior_log_variance_clipped=np.log(np.maximum(post_var, 1e-20)),
      # q(x_{t-1} | x_t, x0) mean coefficients (Ho et al. eq. 7)
      posterior_mean_coef1=np.sqrt(ab_prev) * betas / (1 - ab),
      posterior_mean_coef2=np.sqrt(alphas) * (1 - ab_prev) / (1 - ab),
  )
  for name, value in expected.items():
    table = np.asarray(getattr(sched, name))
    assert table.dtype == np.float32, name
    np.testing.assert_allclose(table, value, rtol=2e-6, err_msg=name)
  assert sched.num_timesteps == 300


def test_sigma_interpolation_at_fractional_timesteps():
  sched = make_schedule("linear", **SD)
  sigmas = np.sqrt((1 - np.asarray(sched.alphas_cumprod, np.float64)) / np.asarray(sched.alphas_cumprod, np.float64))
  t = np.array([0.0, 10.25, 500.5, 998.9])
  np.testing.assert_allclose(np.asarray(sched.sigma_at(t)), np.interp(t, np.arange(1000), sigmas), rtol=1e-5)


def test_bad_betas_are_rejected():
  with pytest.raises(ValueError, match="between 0 and 1"):
    DiffusionSchedule.from_betas(np.array([0.1, 1.5]))
  with pytest.raises(ValueError, match="1-D"):
    DiffusionSchedule.from_betas(np.zeros((2, 2)) + 0.1)


# ---------------------------------------------------------------------------- timestep grids

SPACING_CASES = [(spacing, n) for spacing in ("leading", "trailing", "linspace") for n in (1, 7, 50, 333)]


def _diffusers_timesteps(scheduler_cls, spacing, n, **kwargs):
  scheduler = scheduler_cls(1000, 0.00085, 0.012, "scaled_linear", timestep_spacing=spacing, steps_offset=1, **kwargs)
  scheduler.set_timesteps(n)
  return scheduler.timesteps.numpy()


@pytest.mark.parametrize("spacing,n", SPACING_CASES)
def test_grids_equal_diffusers(spacing, n):
  pytest.importorskip("torch")
  from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

  cases = [("ddim", DDIMScheduler, {}), ("euler", EulerDiscreteScheduler, {}),
           ("dpmpp_2m", DPMSolverMultistepScheduler, {})]
  for sampler, cls, kwargs in cases:
    ref = _diffusers_timesteps(cls, spacing, n, **kwargs)
    ours = SamplerConfig(sampler=sampler, num_steps=n, timestep_spacing=spacing).make_sampler().timesteps(1000)
    np.testing.assert_array_equal(ours, ref, err_msg=f"{sampler} {spacing} {n}")
    assert ours.dtype == ref.dtype, sampler


def test_trailing_grid_has_exactly_n_points():
  # np.arange(1000, 0, -1000 / 61) has 62 points (diffusers then steps to t = -1); we keep the first 61.
  grid = inference_timesteps(1000, 61, "trailing")
  assert len(grid) == 61 and grid[0] == 999 and grid[-1] == 15
  np.testing.assert_array_equal(grid, np.round(np.arange(1000, 0, -1000 / 61))[:61].astype(np.int64) - 1)


@pytest.mark.parametrize("spacing,n", [("leading", 50), ("trailing", 20), ("leading", 2), ("linspace", 1)])
def test_plms_evaluation_times_equal_diffusers_pndm(spacing, n):
  pytest.importorskip("torch")
  from diffusers import PNDMScheduler

  ref = _diffusers_timesteps(PNDMScheduler, spacing, n, skip_prk_steps=True)
  grid = SamplerConfig(sampler="pndm", num_steps=n, timestep_spacing=spacing).make_sampler().timesteps(1000)
  np.testing.assert_array_equal(grid[plms_iterations(n)["eval_index"]], ref)


def test_ldm_uniform_ddim_timesteps_are_leading_with_offset_one():
  # LDM make_ddim_timesteps("uniform", 50, 1000): range(0, 1000, 20) + 1
  np.testing.assert_array_equal(inference_timesteps(1000, 50, "leading", 1), np.arange(0, 1000, 20)[::-1] + 1)


def test_grid_errors_name_the_problem():
  with pytest.raises(ValueError, match="positive"):
    inference_timesteps(1000, 0)
  with pytest.raises(ValueError, match="cannot exceed"):
    inference_timesteps(1000, 1001)
  with pytest.raises(ValueError, match="spacing"):
    inference_timesteps(1000, 10, "uniform")
  with pytest.raises(ValueError, match="outside"):
    inference_timesteps(1000, 1000, "leading", steps_offset=1)
