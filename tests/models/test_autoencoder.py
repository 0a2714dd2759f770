"""Stage-1 autoencoders: latent shapes, parameter names vs the SD v1 checkpoint,
the diagonal-Gaussian posterior against closed forms, and input checks."""

import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ldm_jax.interop.naming import torch_key_to_module_path
from ldm_jax.models.autoencoder import AutoencoderKL, DiagonalGaussian, freeze_ddconfig
from ldm_jax.models.vq import VQModel
from ldm_jax.nn.ae_blocks import conv

KEYS_FILE = pathlib.Path(__file__).parents[1] / "fixtures" / "sd_v1_state_dict_keys.txt"
SD_V1_DDCONFIG = dict(
    double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3,
    ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0,
)


def tiny_ddconfig(levels: int, double_z: bool, **kw) -> dict:
  return dict(
      double_z=double_z, z_channels=3, resolution=64, in_channels=3, out_ch=3, ch=4,
      ch_mult=[1] * levels, num_res_blocks=1, attn_resolutions=[], norm_num_groups=2, **kw,
  )


def shapes(model, x_shape, **kw):
  """(variables, outputs) as ShapeDtypeStructs: traced, never compiled."""
  x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
  out, variables = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, **kw), x)
  return variables, out


@pytest.mark.parametrize("f", [4, 8, 16, 32])
def test_latent_shapes(f):
  levels = int(math.log2(f)) + 1
  kl = AutoencoderKL(ddconfig=tiny_ddconfig(levels, True), embed_dim=5)
  assert kl.downsample_factor == f and kl.latent_channels == 5
  _, (x_rec, post) = shapes(kl, (2, 64, 96, 3), sample_posterior=False)
  assert post.mean.shape == post.logvar.shape == (2, 64 // f, 96 // f, 5)
  assert x_rec.shape == (2, 64, 96, 3)

  vq = VQModel(ddconfig=tiny_ddconfig(levels, False), n_embed=16, embed_dim=5)
  assert vq.downsample_factor == f and vq.latent_channels == 5
  variables, (x_rec, codebook_loss, info) = shapes(vq, (2, 64, 96, 3))
  assert x_rec.shape == (2, 64, 96, 3) and codebook_loss.shape == ()
  assert info.indices_BxHxW.shape == (2, 64 // f, 96 // f)
  assert variables["params"]["quantize"]["embedding"]["embedding"].shape == (16, 5)
  x = jax.ShapeDtypeStruct((2, 64, 96, 3), jnp.float32)
  h = jax.eval_shape(lambda v, x: vq.apply(v, x, method=VQModel.encode), variables, x)
  assert h.shape == (2, 64 // f, 96 // f, 5)


def test_sd_v1_parameter_tree_matches_reference_keys():
  """The 248 first_stage_model.* keys of SD v1, name for name and shape for shape."""
  reference = {}
  for line in KEYS_FILE.read_text().splitlines():
    if line.startswith("first_stage_model."):
      key, shape = line.split(" ", 1)
      reference[key[len("first_stage_model."):]] = tuple(int(d) for d in shape.strip("[]").split(", "))
  assert len(reference) == 248

  model = AutoencoderKL(ddconfig=SD_V1_DDCONFIG, embed_dim=4)
  variables, _ = shapes(model, (1, 256, 256, 3), sample_posterior=False)
  ours = traverse_util.flatten_dict(variables["params"])
  leaf_names = {"weight": ("kernel", "scale"), "bias": ("bias",)}
  matched = set()
  for key, torch_shape in reference.items():
    module, leaf = torch_key_to_module_path(key)
    path = next((module + (n,) for n in leaf_names[leaf] if module + (n,) in ours), None)
    assert path is not None, f"{key} has no counterpart in our parameters"
    shape = ours[path].shape
    if path[-1] == "kernel":  # HWIO -> OIHW
      shape = (shape[3], shape[2], shape[0], shape[1])
    assert shape == torch_shape, key
    matched.add(path)
  assert matched == set(ours)
  n_params = sum(math.prod(v.shape) for v in ours.values())
  assert round(n_params / 1e6, 2) == 83.65


def test_attention_placement_follows_ddconfig():
  cfg = tiny_ddconfig(3, True, attn_type="none")
  cfg["attn_resolutions"] = [32]  # level 1 of both encoder and decoder
  variables, _ = shapes(AutoencoderKL(ddconfig=cfg, embed_dim=3), (1, 64, 64, 3), sample_posterior=False)
  names = {"/".join(p) for p in traverse_util.flatten_dict(variables["params"])}
  assert "encoder/down_1/attn_0/q/kernel" in names and "decoder/up_1/attn_1/proj_out/kernel" in names
  assert not any("down_0/attn" in n or "down_2/attn" in n or "mid/attn_1" in n for n in names)


@pytest.fixture(scope="module")
def posterior():
  rng = np.random.default_rng(0)
  mean = rng.normal(size=(3, 4, 5, 2))
  logvar = rng.normal(size=(3, 4, 5, 2))
  logvar[0, 0, 0, 0], logvar[1, 0, 0, 0] = 25.0, -40.0  # outside the clamp range
  return mean, logvar


def test_posterior_moments_and_clamp(posterior):
  mean, logvar = posterior

  @jax.jit
  def moments(m, key):
    post = DiagonalGaussian.from_moments(m)
    return post.mean, post.logvar, post.std, post.var, post.sample(key), jax.random.normal(key, post.mean.shape)

  ours_mean, ours_logvar, std, var, sample, eps = moments(np.concatenate([mean, logvar], -1).astype(np.float32),
                                                          jax.random.key(3, impl="rbg"))  # quick to compile
  clamped = np.clip(logvar, -30.0, 20.0)
  np.testing.assert_allclose(ours_mean, mean, rtol=1e-6)
  np.testing.assert_allclose(ours_logvar, clamped, rtol=1e-6)
  np.testing.assert_allclose(std, np.exp(0.5 * clamped), rtol=1e-5)
  np.testing.assert_allclose(var, np.exp(clamped), rtol=1e-5)
  np.testing.assert_allclose(sample, mean + np.exp(0.5 * clamped) * eps, rtol=1e-5, atol=1e-6)
  post = DiagonalGaussian(jnp.asarray(mean), jnp.asarray(logvar))
  assert post.mode() is post.mean


def test_posterior_kl_and_nll_closed_form(posterior):
  mean, logvar = posterior
  logvar = np.clip(logvar, -5, 5)  # keep float32 exp well conditioned
  m2, lv2 = mean[::-1].copy(), logvar[::-1].copy()
  sample = mean + 0.3

  @jax.jit
  def divergences(mean, logvar, m2, lv2, sample):
    post, other = DiagonalGaussian(mean, logvar), DiagonalGaussian(m2, lv2)
    return post.kl(), post.kl(other), post.nll(sample)

  kl_std, kl_pair, nll = divergences(*(np.float32(a) for a in (mean, logvar, m2, lv2, sample)))
  # KL(N(m, s^2) || N(0, 1)) = 0.5 (m^2 + s^2 - 1 - log s^2), summed per image.
  np.testing.assert_allclose(kl_std, 0.5 * np.sum(mean**2 + np.exp(logvar) - 1 - logvar, axis=(1, 2, 3)), rtol=1e-5)
  expected_pair = 0.5 * np.sum(lv2 - logvar + (np.exp(logvar) + (mean - m2) ** 2) / np.exp(lv2) - 1, axis=(1, 2, 3))
  np.testing.assert_allclose(kl_pair, expected_pair, rtol=1e-5)
  log_density = -0.5 * np.log(2 * np.pi) - 0.5 * logvar - 0.5 * (sample - mean) ** 2 / np.exp(logvar)
  np.testing.assert_allclose(nll, -np.sum(log_density, axis=(1, 2, 3)), rtol=1e-5)


def test_bad_inputs_are_named():
  kl = AutoencoderKL(ddconfig=tiny_ddconfig(3, True), embed_dim=3)
  with pytest.raises(ValueError, match="3 channels"):
    shapes(kl, (1, 64, 64, 4), sample_posterior=False)
  with pytest.raises(ValueError, match="multiples of 4"):
    shapes(kl, (1, 64, 66, 3), sample_posterior=False)
  with pytest.raises(ValueError, match="needs rng"):
    shapes(kl, (1, 64, 64, 3))
  with pytest.raises(ValueError, match="double_z=True"):
    shapes(AutoencoderKL(ddconfig=tiny_ddconfig(2, False), embed_dim=3), (1, 64, 64, 3), sample_posterior=False)
  with pytest.raises(ValueError, match="double_z=False"):
    shapes(VQModel(ddconfig=tiny_ddconfig(2, True), n_embed=8, embed_dim=3), (1, 64, 64, 3))
  with pytest.raises(ValueError, match="unknown ddconfig keys.*'chmult'"):
    freeze_ddconfig({"chmult": [1, 2]})
  with pytest.raises(ValueError, match="attn_type"):
    freeze_ddconfig({"attn_type": "linear"})


def test_modules_are_hashable_with_yaml_lists():
  a = AutoencoderKL(ddconfig=tiny_ddconfig(2, True), embed_dim=3)
  b = AutoencoderKL(ddconfig=tiny_ddconfig(2, True), embed_dim=3)
  assert hash(a) == hash(b) and a.ddconfig["ch_mult"] == (1, 1)


def test_convs_start_at_pytorch_default_scale():
  """PyTorch's Conv2d default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std bound/sqrt(3)."""
  layer = conv(64, 3, dtype=jnp.float32, param_dtype=jnp.float32)
  kernel = np.asarray(jax.jit(layer.init)(jax.random.key(0, impl="rbg"), jnp.ones((1, 4, 4, 32)))["params"]["kernel"])
  bound = 1 / math.sqrt(9 * 32)
  assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.99 * bound
  np.testing.assert_allclose(kernel.std(), bound / math.sqrt(3), rtol=0.02)
