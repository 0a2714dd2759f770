"""Every sampler against the diffusers scheduler it mirrors (PyTorch, float32).

Both sides denoise with the same exact Gaussian denoiser (JAX for us, PyTorch for
diffusers), start from the same x_T and, for stochastic samplers, draw the same
noise (ours is fed to diffusers). Schedulers use Stable Diffusion's config.
Agreement: max |ours - diffusers| <= 1e-4 * max |diffusers| (we measure ~1e-6).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import SamplerConfig, make_schedule, sample, step_noise
from ldm_jax.diffusion.analytic import gaussian_denoiser, gaussian_params

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers.schedulers import scheduling_ddpm, scheduling_euler_ancestral_discrete  # noqa: E402

SHAPE = (64, 2, 2)  # (B, C, H); data dimension 4
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
SCHEDULERS = {
    "ddim": lambda **kw: diffusers.DDIMScheduler(**SD, set_alpha_to_one=False, clip_sample=False, **kw),
    "pndm": lambda **kw: diffusers.PNDMScheduler(**SD, skip_prk_steps=True, set_alpha_to_one=False, **kw),
    "dpmpp_2m": lambda **kw: diffusers.DPMSolverMultistepScheduler(**SD, **kw),
    "euler": lambda **kw: diffusers.EulerDiscreteScheduler(**SD, **kw),
    "euler_ancestral": lambda **kw: diffusers.EulerAncestralDiscreteScheduler(**SD, **kw),
    "ddpm": lambda **kw: diffusers.DDPMScheduler(**SD, clip_sample=False, **kw),
}


def _scheduler(sampler, spacing="leading", **kwargs):
  """A diffusers scheduler with SD's config; its default spacing differs per class, so always pass it."""
  return SCHEDULERS[sampler](timestep_spacing=spacing, **kwargs)


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(7)
  m = rng.normal(size=(4, 4))
  mean, cov = 1.5 * rng.normal(size=4), m @ m.T / 4 + 0.2 * np.eye(4)
  schedule = make_schedule("linear", 1000, 0.00085, 0.012)
  params = gaussian_params(mean, cov, schedule.sigmas)
  torch_params = {k: torch.tensor(np.asarray(v)) for k, v in params.items()}
  return dict(schedule=schedule, params=params, torch_params=torch_params,
              x_T=rng.normal(size=SHAPE).astype(np.float32), init=rng.normal(size=SHAPE).astype(np.float32))


def _torch_denoiser(p, x, t, prediction_type):
  """The same exact Gaussian denoiser as ``gaussian_denoiser``, in PyTorch."""
  sigma = np.interp(float(t), np.arange(1000), p["sigmas"].double().numpy())
  ab = torch.tensor(1.0 / (1.0 + sigma**2), dtype=torch.float32)
  flat = x.reshape(x.shape[0], -1)
  whitened = ((flat - ab.sqrt() * p["mean"]) @ p["eigvecs"]) / (ab * p["eigvals"] + 1 - ab)
  x0 = p["mean"] + ab.sqrt() * (whitened * p["eigvals"]) @ p["eigvecs"].T
  eps = (1 - ab).sqrt() * whitened @ p["eigvecs"].T
  out = {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[prediction_type]
  return out.reshape(x.shape)


def _run_diffusers(s, scheduler, steps, prediction_type, *, strength=None, eta=None, noises=None):
  """A diffusers pipeline loop (text-to-image, or img2img as StableDiffusionImg2ImgPipeline)."""
  scheduler.set_timesteps(steps)
  timesteps = scheduler.timesteps
  x_T = torch.tensor(s["x_T"])
  if strength is None:
    x = x_T * scheduler.init_noise_sigma
  else:
    start = steps - min(int(steps * strength), steps)
    timesteps = timesteps[start * scheduler.order:]
    if hasattr(scheduler, "set_begin_index"):
      scheduler.set_begin_index(start * scheduler.order)
    x = scheduler.add_noise(torch.tensor(s["init"]), x_T, timesteps[:1].repeat(SHAPE[0]))
  for i, t in enumerate(timesteps):
    out = _torch_denoiser(s["torch_params"], scheduler.scale_model_input(x, t), t, prediction_type)
    kwargs = {} if eta is None else {"eta": eta, "variance_noise": noises[i]}
    x = scheduler.step(out, t, x, **kwargs).prev_sample
  return x.numpy()


def _run_ours(s, config, **kwargs):
  if kwargs.get("strength") is not None:
    kwargs["init_latent"] = s["init"]
  out = sample(gaussian_denoiser(config.prediction_type), s["params"], jnp.asarray(s["x_T"]), s["schedule"], config,
               rng=jax.random.key(11), **kwargs)
  return np.asarray(out)


def _assert_close(ours, ref):
  assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max(), np.abs(ours - ref).max()


def _our_noises(steps):
  return [torch.tensor(np.asarray(step_noise(jax.random.key(11), k, SHAPE)[0])) for k in range(steps)]


# linspace is left out for DDIM / PNDM: diffusers steps those to t - T // N instead of the
# next grid point (see samplers/ddim.py); grids themselves are compared in test_diffusion_schedules.
@pytest.mark.parametrize("sampler,spacing,prediction_type", [
    ("ddim", "leading", "eps"), ("pndm", "leading", "eps"), ("dpmpp_2m", "leading", "eps"), ("euler", "leading", "eps"),
    ("ddim", "trailing", "eps"), ("euler", "linspace", "eps"),
    ("ddim", "leading", "x0"), ("dpmpp_2m", "leading", "v"), ("euler", "leading", "v")])
def test_deterministic_samplers_match_diffusers(setup, sampler, spacing, prediction_type):
  steps = 25
  scheduler = _scheduler(sampler, spacing, prediction_type=DIFFUSERS_PREDICTION[prediction_type])
  ref = _run_diffusers(setup, scheduler, steps, prediction_type)
  config = SamplerConfig(sampler=sampler, num_steps=steps, timestep_spacing=spacing, prediction_type=prediction_type)
  _assert_close(_run_ours(setup, config), ref)


@pytest.mark.parametrize("sampler", ["ddpm", "euler_ancestral", "ddim"])
def test_stochastic_samplers_match_diffusers_with_the_same_noise(setup, sampler, monkeypatch):
  steps = 25
  noises = _our_noises(steps)
  eta = None
  if sampler == "ddim":
    eta = 1.0  # diffusers takes the noise as `variance_noise`
  else:  # diffusers draws it with randn_tensor inside step(): hand it ours, in order
    module = scheduling_ddpm if sampler == "ddpm" else scheduling_euler_ancestral_discrete
    queue = iter(noises)
    monkeypatch.setattr(module, "randn_tensor", lambda *args, **kwargs: next(queue))
  ref = _run_diffusers(setup, _scheduler(sampler), steps, "eps", eta=eta, noises=noises)
  _assert_close(_run_ours(setup, SamplerConfig(sampler=sampler, num_steps=steps), eta=eta or 0.0), ref)


def test_dynamic_thresholding_matches_diffusers(setup):
  steps = 25
  scheduler = _scheduler("ddim", prediction_type="sample", thresholding=True, dynamic_thresholding_ratio=0.9,
                                 sample_max_value=2.5)
  ref = _run_diffusers(setup, scheduler, steps, "x0")
  config = SamplerConfig(sampler="ddim", num_steps=steps, prediction_type="x0", threshold_percentile=0.9,
                         threshold_max=2.5)
  ours = _run_ours(setup, config)
  _assert_close(ours, ref)
  unthresholded = _run_ours(setup, SamplerConfig(sampler="ddim", num_steps=steps, prediction_type="x0"))
  assert np.abs(ours - unthresholded).max() > 0.1  # thresholding did act on this data


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_img2img_matches_diffusers_pipeline_semantics(setup, sampler):
  steps, strength = 25, 0.6
  ref = _run_diffusers(setup, _scheduler(sampler), steps, "eps", strength=strength)
  _assert_close(_run_ours(setup, SamplerConfig(sampler=sampler, num_steps=steps), strength=strength), ref)
