"""The driver: classifier-free guidance, recompilation, img2img, inpainting, dtypes, sharding, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ldm_jax.diffusion import SamplerConfig, make_schedule, sample
from ldm_jax.diffusion.analytic import gaussian_denoiser, gaussian_params

B, D = 8, 6
DDIM = SamplerConfig(sampler="ddim", num_steps=10)
TRACED_BATCHES: list[int] = []  # batch size of every trace of the network
RUN_BATCHES: list[int] = []  # batch size of every network evaluation actually executed


def _recording_denoiser(params, x_t, t_B, cond):
  batch = x_t.shape[0]
  TRACED_BATCHES.append(batch)
  jax.debug.callback(lambda: RUN_BATCHES.append(batch))
  return gaussian_denoiser("eps")(params, x_t, t_B, cond)


def _bfloat16_denoiser(params, x_t, t_B, cond):
  return gaussian_denoiser("eps")(params, x_t, t_B, cond).astype(jnp.bfloat16)


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  m = rng.normal(size=(D, D))
  schedule = make_schedule("linear", 1000, 0.00085, 0.012)
  params = gaussian_params(rng.normal(size=D), m @ m.T / D + 0.3 * np.eye(D), schedule.sigmas)
  draw = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return dict(schedule=schedule, params=params, x_T=draw(B, D), cond=draw(B, D), uncond=draw(B, D),
              init=draw(B, D))


def _sample_array(s, denoise=_recording_denoiser, config=DDIM, **kwargs):
  kwargs.setdefault("rng", jax.random.key(0))
  return sample(denoise, kwargs.pop("params", s["params"]), kwargs.pop("x_T", s["x_T"]), s["schedule"], config,
                **kwargs)


def _sample(s, **kwargs):
  return np.asarray(_sample_array(s, **kwargs))


# ---------------------------------------------------------------------------- guidance


def test_guidance_is_one_batched_call_and_scale_one_skips_the_unconditional_pass(setup):
  s = setup
  TRACED_BATCHES.clear()
  _sample(s, cond=s["cond"])
  assert set(TRACED_BATCHES) == {B}  # no uncond: the unconditional pass is never traced
  TRACED_BATCHES.clear()
  RUN_BATCHES.clear()
  _sample(s, cond=s["cond"], uncond=s["uncond"], guidance_scale=4.0)
  assert set(TRACED_BATCHES) == {B, 2 * B}  # the lax.cond's two branches
  assert RUN_BATCHES == [2 * B] * DDIM.num_steps  # one [uncond; cond] call per step
  RUN_BATCHES.clear()
  _sample(s, cond=s["cond"], uncond=s["uncond"], guidance_scale=1.0)
  assert RUN_BATCHES == [B] * DDIM.num_steps  # scale 1 at run time: conditional pass only


def test_changing_traced_arguments_does_not_recompile(setup):
  s = setup
  kwargs = dict(cond=s["cond"], uncond=s["uncond"])
  _sample(s, guidance_scale=2.0, **kwargs)
  traces = len(TRACED_BATCHES)
  _sample(s, guidance_scale=7.5, **kwargs)
  _sample(s, guidance_scale=7.5, rng=jax.random.key(9), eta=0.7, **kwargs)
  _sample(s, cond=s["uncond"], uncond=s["cond"], guidance_scale=3, x_T=s["init"])
  _sample(s, params=jax.tree.map(lambda p: p * 1.01, s["params"]), **kwargs)
  assert len(TRACED_BATCHES) == traces


def test_guidance_scale_one_equals_the_conditional_model(setup):
  s = setup
  np.testing.assert_allclose(_sample(s, cond=s["cond"], uncond=s["uncond"], guidance_scale=1.0),
                             _sample(s, cond=s["cond"]), rtol=1e-6, atol=1e-6)


def test_guided_samples_equal_the_closed_form_guided_model(setup):
  # The Gaussian denoiser is affine in its mean shift `cond`, so guiding with (c, u, s) is
  # exactly the unguided model with shift u + s (c - u): a check of the whole CFG path.
  s = setup
  scale = 3.5
  guided = _sample(s, cond=s["cond"], uncond=s["uncond"], guidance_scale=scale)
  combined = _sample(s, cond=s["uncond"] + scale * (s["cond"] - s["uncond"]))
  np.testing.assert_allclose(guided, combined, rtol=1e-5, atol=1e-5)
  assert np.abs(guided - _sample(s, cond=s["cond"])).max() > 0.5


def test_guidance_interval_guides_exactly_the_steps_inside_it(setup):
  # DDIM's 10 timesteps are 901, 801, ..., 1: (300, 700) holds 601, 501, 401 and 301.
  s, scale, (low, high) = setup, 3.0, (300.0, 700.0)
  config = SamplerConfig(sampler="ddim", num_steps=10, guidance_interval=(low, high))
  RUN_BATCHES.clear()
  guided = _sample(s, config=config, cond=s["cond"], uncond=s["uncond"], guidance_scale=scale)
  assert RUN_BATCHES == [B] * 3 + [2 * B] * 4 + [B] * 3  # outside the interval the unconditional pass is skipped

  # The reference: the unguided affine model whose mean shift is the guided one inside the interval.
  def switching(params, x_t, t_B, cond):
    inside = ((t_B >= low) & (t_B <= high))[:, None]
    return gaussian_denoiser("eps")(params, x_t, t_B, jnp.where(inside, cond["in"], cond["out"]))

  combined = s["uncond"] + scale * (s["cond"] - s["uncond"])
  reference = _sample(s, denoise=switching, config=DDIM, cond={"in": combined, "out": s["cond"]})
  np.testing.assert_allclose(guided, reference, rtol=1e-5, atol=1e-5)
  everywhere = _sample(s, cond=s["cond"], uncond=s["uncond"], guidance_scale=scale)
  assert np.abs(guided - everywhere).max() > 0.1 and np.abs(guided - _sample(s, cond=s["cond"])).max() > 0.1
  whole = SamplerConfig(sampler="ddim", num_steps=10, guidance_interval=(0, 1000))
  np.testing.assert_allclose(_sample(s, config=whole, cond=s["cond"], uncond=s["uncond"], guidance_scale=scale),
                             everywhere, rtol=1e-6, atol=1e-6)


def test_bfloat16_network_keeps_float32_sampling(setup):
  s = setup
  out = sample(_bfloat16_denoiser, s["params"], s["x_T"], s["schedule"], DDIM, rng=jax.random.key(0))
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), _sample(s), atol=0.1)  # bf16 outputs carry ~1e-2 error


# ---------------------------------------------------------------------------- img2img, inpainting


def test_img2img_strength_zero_returns_the_input(setup):
  s = setup
  for strength in (0.0, 0.05):  # int(10 * 0.05) == 0 steps too
    np.testing.assert_array_equal(_sample(s, init_latent=s["init"], strength=strength), np.asarray(s["init"]))


def test_inpainting_keeps_the_masked_region_exactly(setup):
  s = setup
  keep = jnp.asarray(np.random.default_rng(1).random((B, D)) < 0.5, jnp.float32)  # 1 = keep init_latent
  for sampler in ("ddim", "euler_ancestral"):
    config = SamplerConfig(sampler=sampler, num_steps=10)
    out = _sample(s, config=config, init_latent=s["init"], mask=keep)
    kept = np.asarray(keep, bool)
    np.testing.assert_array_equal(out[kept], np.asarray(s["init"])[kept])
    assert np.abs(out[~kept] - np.asarray(s["init"])[~kept]).min() > 1e-3  # the rest is generated
  # An all-zero mask keeps nothing: plain sampling from the same noise.
  np.testing.assert_allclose(_sample(s, init_latent=s["init"], mask=jnp.zeros((B, 1))), _sample(s), atol=1e-6)


# ---------------------------------------------------------------------------- sharding


def test_batch_sharded_inputs(setup):
  s = setup
  devices = jax.devices()
  assert len(devices) == 8
  batch_sharded = NamedSharding(Mesh(np.array(devices), ("data",)), PartitionSpec("data"))
  put = lambda a: jax.device_put(a, batch_sharded)
  kwargs = dict(guidance_scale=3.0, eta=1.0, rng=jax.random.key(3), denoise=gaussian_denoiser("eps"))
  sharded = _sample_array(s, x_T=put(s["x_T"]), cond=put(s["cond"]), uncond=put(s["uncond"]), **kwargs)
  assert sharded.sharding.is_equivalent_to(batch_sharded, 2)  # stays batch-sharded end to end
  reference = _sample(s, cond=s["cond"], uncond=s["uncond"], **kwargs)
  np.testing.assert_allclose(np.asarray(sharded), reference, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,message", [
    (dict(sampler="heun"), "unknown sampler 'heun'.*expected one of"),
    (dict(num_steps=0), "num_steps must be a positive integer"),
    (dict(timestep_spacing="karras"), "timestep_spacing"),
    (dict(prediction_type="score"), "prediction_type"),
    (dict(ddpm_variance="learned"), "ddpm_variance"),
    (dict(clip_x0=1.0, threshold_percentile=0.99), "not both"),
    (dict(guidance_interval=(700, 300)), "guidance_interval must be"),
    (dict(guidance_interval=(-1, 300)), "guidance_interval must be"),
    (dict(guidance_interval=(100,)), "guidance_interval must be"),
])
def test_bad_configs_are_rejected(kwargs, message):
  with pytest.raises(ValueError, match=message):
    SamplerConfig(**kwargs)


def test_bad_sample_inputs_are_rejected(setup):
  s = setup
  cases = [
      (dict(init_latent=s["init"], strength=1.5), "strength must be a number in \\[0, 1\\]"),
      (dict(init_latent=s["init"], strength=-0.1), "strength must be a number in \\[0, 1\\]"),
      (dict(strength=0.5), "need init_latent"),
      (dict(init_latent=s["init"]), "needs strength .* or mask"),
      (dict(init_latent=s["init"][:, :3], strength=0.5), "init_latent shape"),
      (dict(init_latent=s["init"], mask=jnp.ones((B, 3))), "mask shape"),
      (dict(init_latent=s["init"], mask=jnp.ones((D,))), "mask shape"),
      (dict(uncond=s["uncond"]), "uncond was given without cond"),
      (dict(cond={"a": s["cond"]}, uncond=s["uncond"]), "same pytree structure"),
      (dict(cond=s["cond"], uncond=s["uncond"][:, :2]), "uncond leaf shape"),
      (dict(guidance_scale=jnp.ones(3)), "guidance_scale must be a scalar"),
      (dict(eta=-1.0), "eta must be >= 0"),
  ]
  for kwargs, message in cases:
    with pytest.raises(ValueError, match=message):
      _sample(s, **kwargs)
  with pytest.raises(ValueError, match="eta applies to the 'ddim' sampler only"):
    _sample(s, config=SamplerConfig(sampler="plms", num_steps=5), eta=0.5)
  with pytest.raises(TypeError, match="SamplerConfig"):
    sample(_recording_denoiser, s["params"], s["x_T"], s["schedule"], {"sampler": "ddim"}, rng=jax.random.key(0))
