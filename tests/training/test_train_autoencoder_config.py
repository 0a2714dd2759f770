"""configs/autoencoder.py: the model zoo builds (abstractly) with the
reference's shapes, words combine or fail clearly, and ``train`` rejects bad
settings before compiling anything."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.apps.train import train_first_stage as train
from ldm_jax.config import ConfigError, load_config
from ldm_jax.models.autoencoder import AutoencoderKL
from ldm_jax.models.first_stage import make_first_stage
from ldm_jax.training.optim import make_optimizer
from ldm_jax.training.train_autoencoder import loss_config, make_discriminator

CONFIG = pathlib.Path(__file__).parents[2] / "configs" / "autoencoder.py"
KEYS_FILE = pathlib.Path(__file__).parents[1] / "fixtures" / "sd_v1_state_dict_keys.txt"
# variant: (kind, downsampling factor, latent channels, codebook size, levels with attention, mid attention)
ZOO = {
    "kl_f4": ("kl", 4, 3, None, (), True),
    "kl_f8": ("kl", 8, 4, None, (), True),
    "kl_f16": ("kl", 16, 16, None, (4,), True),
    "kl_f32": ("kl", 32, 64, None, (4, 5), True),
    "vq_f4": ("vq", 4, 3, 8192, (), True),
    "vq_f4_noattn": ("vq", 4, 3, 8192, (), False),
    "vq_f8": ("vq", 8, 4, 16384, (3,), True),
    "vq_f8_n256": ("vq", 8, 4, 256, (3,), True),
    "vq_f16": ("vq", 16, 8, 16384, (4,), True),
}


def get(arg: str):
  return load_config(f"{CONFIG}:{arg}")


def abstract_params(model):
  f = model.downsample_factor
  x = jax.ShapeDtypeStruct((1, f, f, 3), jnp.float32)
  kw = {"sample_posterior": False} if isinstance(model, AutoencoderKL) else {}
  return jax.eval_shape(lambda k, x: model.init(k, x, **kw), jax.random.key(0), x)["params"]


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_variant_builds_with_reference_structure(name):
  kind, factor, channels, n_embed, attn_levels, mid_attn = ZOO[name]
  for arg in (name, f"{name},tiny"):
    config = get(arg)
    model = make_first_stage(config.model)
    params = abstract_params(model)
    assert config.stage == "autoencoder" and config.model.kind == kind
    assert model.downsample_factor == factor and model.latent_channels == channels
    if n_embed:
      assert params["quantize"]["embedding"]["embedding"].shape[1] == channels
      assert config.model.n_embed == (n_embed if arg == name else min(n_embed, 64))
    enc = params["encoder"]
    assert [i for i in range(len(config.model.ddconfig.ch_mult)) if "attn_0" in enc[f"down_{i}"]] == list(attn_levels)
    assert ("attn_1" in enc["mid"]) == mid_attn
    assert config.data.image_size % factor == 0
    make_discriminator(config.loss)  # the reference's discriminator keys map on
  full = get(name)
  assert full.model.ddconfig.ch == 128 and full.model.ddconfig.num_res_blocks == 2 and full.data.image_size == 256


def test_kl_f8_is_the_stable_diffusion_autoencoder():
  """Same parameter count as the SD v1 VAE in the reference state dict."""
  expected = 0
  for line in KEYS_FILE.read_text().splitlines():
    if line.startswith("first_stage_model."):
      shape = line.split(" ", 1)[1].strip("[]")
      expected += int(np.prod([int(s) for s in shape.split(",")] if shape else []))
  params = abstract_params(make_first_stage(get("kl_f8").model))
  assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) == expected


def test_reference_loss_and_learning_rate():
  kl, vq16 = get("kl_f8"), get("vq_f16")
  assert (kl.loss.disc_start, kl.loss.kl_weight, kl.loss.disc_weight) == (50001, 1e-6, 0.5)
  assert (vq16.loss.disc_start, vq16.loss.disc_weight, vq16.loss.disc_num_layers) == (250001, 0.75, 2)
  assert kl.loss.perceptual_weight == 1.0 and not kl.loss.train_logvar
  _, schedule = make_optimizer(kl.optim, kl.train.num_steps, kl.train.batch_size)
  np.testing.assert_allclose(schedule(0), 4.5e-6 * kl.train.batch_size, rtol=1e-6)  # base_lr x batch
  assert (kl.optim.name, kl.optim.b1, kl.optim.b2) == ("adam", 0.5, 0.9)


def test_dataset_words():
  assert get("kl_f8").data.source == "shapes"
  assert get("kl_f8,folder").data.source == "folder"
  config = get("vq_f8,tfds:celeb_a_hq/256")
  assert (config.data.source, config.data.name) == ("tfds", "celeb_a_hq/256")
  demo = get("demo")
  assert (demo.model.kind, demo.data.image_size, demo.loss.perceptual_weight) == ("kl", 64, 0.0)
  assert get("demo_vq").model.kind == "vq"
  # The demo's posterior starts at std 0.05, and the key reaches the loss config the init reads.
  assert loss_config(demo.loss).posterior_logvar_init == -6.0
  assert loss_config(get("kl_f8").loss).posterior_logvar_init == 0.0  # the reference's init


@pytest.mark.parametrize("arg, message", [
    ("kl_f9", r"unknown config variant 'kl_f9'.*Did you mean kl_f8"),
    ("kl_f8,vq_f8", "choose one model variant"),
    ("demo,kl_f8", "'demo' and 'demo_vq' are complete models"),
    ("folder,tfds:mnist", "choose one dataset word"),
])
def test_bad_variants_fail_clearly(arg, message):
  with pytest.raises(ConfigError, match=message):
    get(arg)


def test_train_rejects_bad_settings_before_compiling(tmp_path):
  config = get("kl_f4,tiny")
  config.loss.perceptual_weight = 1.0
  with pytest.raises(FileNotFoundError, match=r"(?s)LPIPS weights not found.*python -m ldm_jax.interop.lpips"):
    train(config, str(tmp_path))
  config = get("kl_f4,tiny")
  config.data.image_size = 30
  with pytest.raises(ValueError, match="image_size 30 is not a multiple of 4"):
    train(config, str(tmp_path))
  config = get("kl_f4,tiny")
  config.train.crop_size = 64
  with pytest.raises(ValueError, match="crop_size 64 exceeds data.image_size 32"):
    train(config, str(tmp_path))
  config = get("vq_f4,tiny")
  config.loss.posterior_logvar_init = -6.0
  with pytest.raises(ValueError, match=r"posterior_logvar_init=-6.0 sets a KL posterior.*model.kind is 'vq'"):
    train(config, str(tmp_path))
