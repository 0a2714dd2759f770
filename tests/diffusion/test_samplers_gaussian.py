"""Every sampler against closed-form truth on Gaussian (and Gaussian-mixture) data.

With ``x0 ~ N(mu, S)`` the exact denoiser is known, and so are

- the exact probability-flow ODE map (what deterministic samplers approximate);
- the exact output distribution of a stochastic sampler: each of its steps is
  an affine map plus independent noise, so its mean and variance propagate in
  closed form along every eigenvector of ``S`` (float64 NumPy below, written
  from the papers' formulas, independently of the library's step tables).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import SamplerConfig, initial_state, make_beta_schedule, make_iteration, make_plan, sample
from ldm_jax.diffusion.analytic import gaussian_denoiser, gaussian_params, mixture_denoiser, mixture_params
from ldm_jax.diffusion.schedules import DiffusionSchedule

STEPS, N, D = 100, 6000, 3
SD_BETAS = make_beta_schedule("linear", 1000, 0.00085, 0.012)
AB64 = np.cumprod(1.0 - SD_BETAS)


@pytest.fixture(scope="module")
def gaussian():
  rng = np.random.default_rng(0)
  m = rng.normal(size=(D, D))
  cov = m @ m.T / D + 0.3 * np.eye(D)
  mean = np.array([1.0, -0.5, 0.3])
  schedule = DiffusionSchedule.from_betas(SD_BETAS)
  lam, u = np.linalg.eigh(cov)
  return dict(schedule=schedule, mean=mean, cov=cov, lam=lam, u=u,
              params=gaussian_params(mean, cov, schedule.sigmas),
              z=rng.normal(size=(N, D)).astype(np.float32))


def _config(sampler, **kwargs):
  return SamplerConfig(sampler=sampler, num_steps=STEPS, set_alpha_to_one=True, **kwargs)


def _run(g, config, x_T, rng=0, **kwargs):
  out = sample(gaussian_denoiser(config.prediction_type), g["params"], jnp.asarray(x_T, jnp.float32), g["schedule"],
               config, rng=jax.random.key(rng), **kwargs)
  return np.asarray(out, np.float64)


def _flow_map64(g, x, ab_from, ab_to):
  """Exact PF-ODE transport: (x - sqrt(a) mu) keeps its size in marginal standard deviations."""
  y = (x - np.sqrt(ab_from) * g["mean"]) @ g["u"]
  y *= np.sqrt((ab_to * g["lam"] + 1 - ab_to) / (ab_from * g["lam"] + 1 - ab_from))
  return np.sqrt(ab_to) * g["mean"] + y @ g["u"].T


# Mean |error| vs the exact flow at 100 steps; first-order samplers (DDIM = Euler) are
# ~2x the second-order DPM-Solver++ and ~20x PLMS. Bounds are ~1.5x the measured errors.
FLOW_CASES = [("ddim", "eps", 0.016), ("euler", "eps", 0.016), ("dpmpp_2m", "eps", 0.008), ("plms", "eps", 0.001),
              ("ddim", "x0", 0.016), ("euler", "v", 0.016)]


@pytest.mark.parametrize("sampler,prediction_type,tolerance", FLOW_CASES)
def test_deterministic_samplers_follow_the_exact_flow(gaussian, sampler, prediction_type, tolerance):
  config = _config(sampler, prediction_type=prediction_type)
  t0 = config.make_sampler().timesteps(1000)[0]
  out = _run(gaussian, config, gaussian["z"])  # leading grid: every sampler starts from x_t0 = z
  error = np.abs(out - _flow_map64(gaussian, gaussian["z"].astype(np.float64), AB64[int(t0)], 1.0))
  assert error.mean() < tolerance, error.mean()
  assert error.max() < 12 * tolerance, error.max()


def _whitened_moments(g, samples):
  chol = np.linalg.cholesky(g["cov"])
  w = np.linalg.solve(chol, (samples - g["mean"]).T).T
  return w.mean(0), np.cov(w.T)


# Whitened moments of N = 6000 samples: Monte-Carlo std ~0.013 (mean) and ~0.018 (cov); the
# exact flow of these x_T is off by 0.035 (2 std). On top, at 100 steps, discretisation shrinks
# the covariance by ~0.04 (first order), ~0.02 (DPM-Solver++ 2M), <0.005 (PLMS), and ancestral
# samplers with a fixed variance have an O(1/N) variance bias of ~0.07 (the exact propagation
# test below pins that down).
@pytest.mark.parametrize("sampler,cov_tolerance", [
    ("ddim", 0.1), ("euler", 0.1), ("dpmpp_2m", 0.08), ("plms", 0.06),
    ("ddpm", 0.15), ("euler_ancestral", 0.15)])
def test_samples_match_the_data_moments(gaussian, sampler, cov_tolerance):
  g = gaussian
  config = _config(sampler)
  t0 = int(config.make_sampler().timesteps(1000)[0])
  # Start from the exact marginal at t0 (not N(0, I)) so that only the sampler is tested; for
  # Euler samplers x_T * init_noise_sigma (leading: sqrt(sigma^2 + 1)) is the same x_t0.
  marginal = AB64[t0] * g["cov"] + (1 - AB64[t0]) * np.eye(D)
  x_T = np.sqrt(AB64[t0]) * g["mean"] + g["z"] @ np.linalg.cholesky(marginal).T
  mean_w, cov_w = _whitened_moments(g, _run(g, config, x_T))
  assert np.abs(mean_w).max() < 0.06, mean_w
  assert np.abs(cov_w - np.eye(D)).max() < cov_tolerance, cov_w


def _stochastic_moments64(g, sampler, grid, eta=0.0, variance="fixed_small"):
  """Mean and variance, per eigen-coordinate, of a stochastic sampler's output for x_T ~ N(0, I).

  Each step is ``y' = P x0(y) + Q y + s z`` with the exact ``x0(y) = G y + H mu``.
  """
  lam, mu = g["lam"], g["u"].T @ g["mean"]
  ab = AB64[grid.astype(int)]
  ab_next = np.append(ab[1:], 1.0)
  sigma = np.sqrt((1 - ab) / ab)
  sigma_next = np.append(sigma[1:], 0.0)
  m, v = np.zeros(D), np.ones(D) * (sigma[0] ** 2 + 1 if sampler == "euler_ancestral" else 1.0)
  for i, (a, a2) in enumerate(zip(ab, ab_next)):
    gain = np.sqrt(a) * lam / (a * lam + 1 - a)  # d E[x0 | x_t] / d x_t
    if sampler == "euler_ancestral":  # variance-exploding state x = x_t / sqrt(a)
      s_up = np.sqrt(sigma_next[i] ** 2 * (sigma[i] ** 2 - sigma_next[i] ** 2) / sigma[i] ** 2)
      ratio = (np.sqrt(sigma_next[i] ** 2 - s_up**2) - sigma[i]) / sigma[i]
      G, P, Q, s = gain * np.sqrt(a), -ratio, 1 + ratio, s_up
    elif sampler == "ddpm":  # Ho et al. eq. 7 posterior between grid points
      beta = 1 - a / a2
      post = (1 - a2) / (1 - a) * beta if variance == "fixed_small" else beta
      G, P, Q = gain, np.sqrt(a2) * beta / (1 - a), np.sqrt(a / a2) * (1 - a2) / (1 - a)
      s = 0.0 if i == len(ab) - 1 else np.sqrt(post)
    else:  # DDIM, Song et al. eq. 12 with eps = (x_t - sqrt(a) x0) / sqrt(1 - a)
      s = eta * np.sqrt((1 - a2) / (1 - a) * (1 - a / a2))
      k = np.sqrt(1 - a2 - s**2)
      G, P, Q = gain, np.sqrt(a2) - k * np.sqrt(a) / np.sqrt(1 - a), k / np.sqrt(1 - a)
    H = 1 - gain * np.sqrt(a)
    m, v = (P * G + Q) * m + P * H * mu, (P * G + Q) ** 2 * v + s**2
  return m, v


# DDPM runs 20 steps here: there fixed_small and fixed_large differ by > 10 Monte-Carlo stds.
@pytest.mark.parametrize("sampler,steps,kwargs", [
    ("ddpm", 20, {}), ("ddpm", 20, {"ddpm_variance": "fixed_large"}), ("euler_ancestral", STEPS, {}),
    ("ddim", STEPS, {"eta": 1.0}), ("ddim", STEPS, {"eta": 0.5})])
def test_stochastic_samplers_match_exact_output_distribution(gaussian, sampler, steps, kwargs):
  g = gaussian
  kwargs = dict(kwargs)
  eta = kwargs.pop("eta", 0.0)
  config = SamplerConfig(sampler=sampler, num_steps=steps, set_alpha_to_one=True, **kwargs)
  grid = config.make_sampler().timesteps(1000)
  m, v = _stochastic_moments64(g, sampler, grid, eta, config.ddpm_variance)
  y = _run(g, config, g["z"], rng=1, eta=eta) @ g["u"]
  # 5 Monte-Carlo standard deviations of a mean and of a variance.
  np.testing.assert_array_less(np.abs(y.mean(0) - m), 5 * np.sqrt(v / N))
  np.testing.assert_array_less(np.abs(y.var(0) - v), 5 * v * np.sqrt(2 / N))


def test_fixed_small_and_fixed_large_are_distinguishable(gaussian):
  grid = SamplerConfig(sampler="ddpm", num_steps=20).make_sampler().timesteps(1000)
  _, v_small = _stochastic_moments64(gaussian, "ddpm", grid)
  _, v_large = _stochastic_moments64(gaussian, "ddpm", grid, variance="fixed_large")
  # Twice the test's 5-std tolerance on every coordinate: swapping the two variances fails above.
  assert np.all(np.abs(v_large - v_small) / (v_small * np.sqrt(2 / N)) > 10)


def test_ddim_eta_zero_is_deterministic_and_eta_one_uses_the_rng(gaussian):
  config = _config("ddim")
  first, second = (_run(gaussian, config, gaussian["z"], rng=r) for r in (1, 2))
  np.testing.assert_array_equal(first, second)
  a = _run(gaussian, config, gaussian["z"], rng=1, eta=1.0)
  b = _run(gaussian, config, gaussian["z"], rng=2, eta=1.0)
  assert np.abs(a - b).mean() > 0.1


def test_mixture_modes_weights_and_spreads():
  weights, means, std = np.array([0.3, 0.7]), np.array([[-2.0, -2.0], [2.0, 2.0]]), 0.5
  schedule = DiffusionSchedule.from_betas(SD_BETAS)
  params = mixture_params(weights, means, [std, std], schedule.sigmas)
  config = SamplerConfig(sampler="dpmpp_2m", num_steps=50, set_alpha_to_one=True)
  t0 = int(config.make_sampler().timesteps(1000)[0])
  rng, n = np.random.default_rng(2), 4000
  component = (rng.random(n) >= weights[0]).astype(int)
  a = AB64[t0]
  x_T = np.sqrt(a) * means[component] + np.sqrt(a * std**2 + 1 - a) * rng.normal(size=(n, 2))
  out = np.asarray(sample(mixture_denoiser("eps"), params, jnp.asarray(x_T, jnp.float32), schedule, config,
                          rng=jax.random.key(0)))
  left = out.sum(1) < 0
  assert abs(left.mean() - 0.3) < 0.03  # Monte-Carlo std 0.007
  for mode, members in ((0, out[left]), (1, out[~left])):
    np.testing.assert_allclose(members.mean(0), means[mode], atol=0.05)
    np.testing.assert_allclose(members.std(0), std, atol=0.05)


@pytest.mark.parametrize("sampler,with_mask", [("plms", True), ("ddpm", False)])
def test_scan_program_equals_python_loop(gaussian, sampler, with_mask):
  g = gaussian
  config, n = (_config(sampler), N) if not with_mask else (SamplerConfig(sampler=sampler, num_steps=12), 16)
  x_T, rng = jnp.asarray(g["z"][:n]), jax.random.key(5)
  init, mask = None, None
  if with_mask:  # inpainting exercises the known-region noise and PLMS's saved state and eps history
    init = jnp.asarray(np.random.default_rng(3).normal(size=(n, D)), jnp.float32)
    mask = jnp.asarray(np.random.default_rng(4).random((n, 1)) < 0.5, jnp.float32)
  denoise = gaussian_denoiser("eps")
  scanned = sample(denoise, g["params"], x_T, g["schedule"], config, rng=rng, init_latent=init, mask=mask)

  plan = jax.jit(make_plan, static_argnums=1)(g["schedule"], config)  # one compile instead of many eager ops
  sampler_obj = config.make_sampler()
  # Jitted like the scan body, so that both get the same XLA float arithmetic (eager ops round differently).
  step = jax.jit(make_iteration(sampler_obj, denoise, g["params"], rng=rng, known=init, mask=mask))
  carry = sampler_obj.init_carry(initial_state(plan, x_T, init, mask, from_init=False))
  for k in range(plan.table.t_model.shape[0]):
    carry = step(carry, jax.tree.map(lambda column: column[k], plan.table), k)
  np.testing.assert_allclose(np.asarray(scanned), np.asarray(carry["x"]), rtol=1e-6, atol=1e-6)
