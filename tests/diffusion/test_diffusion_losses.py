"""Forward process, parameterisations, training loss, loss logging, thresholding and guidance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import (
    cfg_combine,
    clip_x0,
    diffusion_loss,
    dynamic_threshold,
    guided_output,
    loss_by_timestep_bucket,
    make_beta_schedule,
    make_schedule,
    predict_eps,
    predict_x0,
    q_sample,
    sample_timesteps,
    training_target,
)
from ldm_jax.diffusion.parameterization import alpha_bar_at

B, SHAPE = 6, (6, 4, 4, 3)


@pytest.fixture(scope="module")
def setup():
  schedule = make_schedule("linear", 1000, 0.00085, 0.012)
  alpha_bar64 = np.cumprod(1 - make_beta_schedule("linear", 1000, 0.00085, 0.012))
  rng = np.random.default_rng(0)
  return dict(
      schedule=schedule,
      ab=alpha_bar64,
      x0=rng.normal(size=SHAPE).astype(np.float32),
      noise=rng.normal(size=SHAPE).astype(np.float32),
      out=rng.normal(size=SHAPE).astype(np.float32),
      t=np.array([0, 17, 250, 500, 871, 999]),
  )


def _bcast(values, ndim=4):
  return values.reshape((-1,) + (1,) * (ndim - 1))


def test_q_sample_matches_float64(setup):
  s = setup
  ab = _bcast(s["ab"][s["t"]])
  expected = np.sqrt(ab) * s["x0"] + np.sqrt(1 - ab) * s["noise"]
  got = q_sample(s["schedule"], s["x0"], s["t"], s["noise"])
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_conversions_recover_x0_and_eps(setup, prediction_type):
  s = setup
  ab = jnp.asarray(_bcast(s["ab"][s["t"]]), jnp.float32)
  x_t = q_sample(s["schedule"], s["x0"], s["t"], s["noise"])
  output = training_target(s["x0"], s["noise"], ab, prediction_type)
  # x0 from eps divides by sqrt(a_bar) (~0.07 at t = 999): allow for the amplified rounding.
  np.testing.assert_allclose(np.asarray(predict_x0(output, x_t, ab, prediction_type)), s["x0"], atol=5e-5)
  np.testing.assert_allclose(np.asarray(predict_eps(output, x_t, ab, prediction_type)), s["noise"], atol=5e-5)


def test_v_target_matches_diffusers(setup):
  torch = pytest.importorskip("torch")
  from diffusers import DDPMScheduler

  s = setup
  ref = DDPMScheduler(1000, 0.00085, 0.012, "scaled_linear").get_velocity(
      torch.tensor(s["x0"]), torch.tensor(s["noise"]), torch.tensor(s["t"]))
  ab = alpha_bar_at(s["schedule"], s["t"], 4)
  np.testing.assert_allclose(np.asarray(training_target(s["x0"], s["noise"], ab, "v")), ref.numpy(), atol=2e-6)


def _hand_target(s, prediction_type):
  ab = _bcast(s["ab"][s["t"]])
  return {"eps": s["noise"], "x0": s["x0"], "v": np.sqrt(ab) * s["noise"] - np.sqrt(1 - ab) * s["x0"]}[prediction_type]


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
@pytest.mark.parametrize("loss_type", ["l2", "l1"])
def test_loss_matches_hand_computation(setup, prediction_type, loss_type):
  s = setup
  diff = s["out"].astype(np.float64) - _hand_target(s, prediction_type)
  per_element = diff**2 if loss_type == "l2" else np.abs(diff)
  expected = per_element.mean(axis=(1, 2, 3))
  got = diffusion_loss(jnp.asarray(s["out"]), s["x0"], s["noise"], s["t"], s["schedule"],
                       prediction_type=prediction_type, loss_type=loss_type)
  assert got.shape == (B,) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_min_snr_weighting(setup, prediction_type):
  s = setup
  ab = s["ab"][s["t"]]
  snr = ab / (1 - ab)
  # Hang et al. 2023: w = min(SNR, 5) on the x0 loss; divided by SNR for eps and by SNR + 1 for v.
  weight = {"x0": np.minimum(snr, 5), "eps": np.minimum(snr, 5) / snr, "v": np.minimum(snr, 5) / (snr + 1)}
  plain = ((s["out"].astype(np.float64) - _hand_target(s, prediction_type)) ** 2).mean(axis=(1, 2, 3))
  got = diffusion_loss(s["out"], s["x0"], s["noise"], s["t"], s["schedule"], prediction_type=prediction_type,
                       weighting="min_snr")
  # float32 1 - a_bar at t = 0 (8.5e-4) carries ~1e-4 relative error into the SNR.
  np.testing.assert_allclose(np.asarray(got), plain * weight[prediction_type], rtol=1e-4)


def test_bfloat16_output_gives_float32_loss(setup):
  s = setup
  got = diffusion_loss(jnp.asarray(s["out"], jnp.bfloat16), s["x0"], s["noise"], s["t"], s["schedule"],
                       prediction_type="eps")
  expected = ((np.asarray(jnp.asarray(s["out"], jnp.bfloat16), np.float64) - s["noise"]) ** 2).mean((1, 2, 3))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)


def test_loss_rejects_bad_arguments(setup):
  s = setup
  args = (s["out"], s["x0"], s["noise"], s["t"], s["schedule"])
  with pytest.raises(ValueError, match="loss_type"):
    diffusion_loss(*args, prediction_type="eps", loss_type="huber")
  with pytest.raises(ValueError, match="weighting"):
    diffusion_loss(*args, prediction_type="eps", weighting="p2")
  with pytest.raises(ValueError, match="prediction_type"):
    diffusion_loss(*args, prediction_type="score")
  with pytest.raises(ValueError, match="same shape"):
    diffusion_loss(s["out"][:, :2], *args[1:], prediction_type="eps")


def test_sample_timesteps_covers_range():
  t = np.asarray(sample_timesteps(jax.random.key(0), 20000, 10))
  assert t.dtype == np.int32 and t.min() == 0 and t.max() == 9
  np.testing.assert_allclose(np.bincount(t) / 20000, 0.1, atol=0.01)


def logit_normal_cdf(k: np.ndarray, T: int, loc: float, scale: float) -> np.ndarray:
  """P(t <= k) for t = floor(T * sigmoid(loc + scale * n)): Phi((logit((k + 1) / T) - loc) / scale)."""
  from scipy.stats import norm
  u = np.clip((k + 1) / T, 1e-12, 1 - 1e-12)
  return norm.cdf((np.log(u / (1 - u)) - loc) / scale)


@pytest.mark.parametrize("loc,scale", [(0.0, 1.0), (-0.85, 1.0), (0.5, 0.6)])
def test_logit_normal_timesteps_match_the_closed_form_cdf(loc, scale):
  T, n = 1000, 200_000
  t = np.asarray(sample_timesteps(jax.random.key(3), n, T, "logit_normal", loc, scale))
  assert t.dtype == np.int32 and t.min() >= 0 and t.max() <= T - 1
  k = np.arange(T)
  empirical = np.cumsum(np.bincount(t, minlength=T)) / n
  # Kolmogorov-Smirnov: 1.95 / sqrt(n) is the 0.1% critical value.
  assert np.abs(empirical - logit_normal_cdf(k, T, loc, scale)).max() < 1.95 / np.sqrt(n)


def test_timestep_sampling_rejects_unknown_kinds_and_scales():
  with pytest.raises(ValueError, match="unknown timestep_sampling 'lognormal'"):
    sample_timesteps(jax.random.key(0), 4, 10, "lognormal")
  with pytest.raises(ValueError, match="timestep_scale must be > 0"):
    sample_timesteps(jax.random.key(0), 4, 10, "logit_normal", 0.0, 0.0)


def test_loss_buckets_match_numpy_inside_jit():
  rng = np.random.default_rng(1)
  t = np.concatenate([rng.integers(0, 300, 40), rng.integers(700, 1000, 24)])  # buckets 3..6 stay empty
  loss = rng.uniform(0.1, 2.0, size=t.shape).astype(np.float32)
  means, counts = jax.jit(loss_by_timestep_bucket, static_argnums=(2, 3))(loss, t, 1000, 10)
  bucket = t // 100
  expected_counts = np.bincount(bucket, minlength=10)
  np.testing.assert_array_equal(np.asarray(counts), expected_counts)
  for b in range(10):
    if expected_counts[b]:
      np.testing.assert_allclose(float(means[b]), loss[bucket == b].mean(), rtol=1e-6)
    else:
      assert np.isnan(float(means[b]))


# ---------------------------------------------------------------------------- x0 processing


def test_dynamic_threshold_matches_numpy_quantile():
  x0 = (np.random.default_rng(2).standard_t(3, size=(5, 8, 8, 4)) * np.array([0.2, 1, 2, 4, 8])[:, None, None, None])
  got = np.asarray(dynamic_threshold(jnp.asarray(x0, jnp.float32), 0.9, max_value=3.0))
  flat = np.abs(x0.reshape(5, -1))
  s = np.clip(np.quantile(flat, 0.9, axis=1), 1.0, 3.0)[:, None, None, None]
  np.testing.assert_allclose(got, np.clip(x0, -s, s) / s, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(clip_x0(jnp.asarray(x0), 1.5)), np.clip(x0, -1.5, 1.5), rtol=1e-6)


# ---------------------------------------------------------------------------- guidance


def _nonlinear_denoiser(params, x, t, cond):
  return jnp.tanh(x * params["w"] + cond["ctx"].mean(axis=(1, 2))[:, None] + 1e-3 * t[:, None])


def test_guided_output_equals_hand_combination():
  rng = np.random.default_rng(3)
  params = {"w": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}
  x, t = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32), jnp.array([10.0, 500.0, 990.0])
  cond = {"ctx": jnp.asarray(rng.normal(size=(3, 7, 2)), jnp.float32)}
  uncond = {"ctx": jnp.asarray(rng.normal(size=(3, 7, 2)), jnp.float32)}
  out_c, out_u = _nonlinear_denoiser(params, x, t, cond), _nonlinear_denoiser(params, x, t, uncond)
  for scale in (1.0, 7.5):
    got = guided_output(_nonlinear_denoiser, params, x, t, cond, uncond, jnp.float32(scale))
    # float32: the batched and the separate denoiser calls may round differently (fusion), and the scale
    # multiplies that: (1 + 7.5) * 6e-8 relative error on outputs up to ~5 gives up to ~3e-6.
    np.testing.assert_allclose(np.asarray(got), np.asarray(out_u + scale * (out_c - out_u)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(guided_output(_nonlinear_denoiser, params, x, t, cond)), np.asarray(out_c))
  np.testing.assert_allclose(np.asarray(cfg_combine(out_u, out_c, 3.0)), np.asarray(3.0 * out_c - 2.0 * out_u),
                             rtol=1e-5, atol=1e-6)
