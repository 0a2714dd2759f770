"""The identity first stage (pixel-space LDM-1): exact encode/decode, no parameters, and a
stage-2 model on it trains, is saved with its run and samples."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ldm_jax.assembly import build_model, example_inputs, random_first_stage, schedule_from_config, step_config
from ldm_jax.config import load_config
from ldm_jax.models.first_stage import IdentityFirstStage, decode_latents, encode_latents, make_first_stage
from ldm_jax.pipeline import LDMPipeline
from ldm_jax.training import ldm_step
from ldm_jax.training.first_stage_copy import copy_differs, load_first_stage_copy, save_first_stage_copy

IDENTITY = {"kind": "identity", "embed_dim": 3}


def test_encode_and_decode_are_exact_and_parameter_free():
  model = make_first_stage(IDENTITY)
  assert isinstance(model, IdentityFirstStage)
  assert (model.downsample_factor, model.latent_channels) == (1, 3)
  x = np.random.default_rng(0).uniform(-1, 1, size=(2, 8, 6, 3)).astype(np.float32)
  variables = model.init(jax.random.key(0), x)
  assert variables == {}
  z = encode_latents(model, variables, x, jax.random.key(1))  # an rng draws nothing: the latent is deterministic
  assert isinstance(z, jax.Array)
  np.testing.assert_array_equal(np.asarray(z), x)
  np.testing.assert_array_equal(np.asarray(decode_latents(model, variables, z)), x)


def test_config_keys_and_bad_input():
  # A stage-2 base config's first_stage.model carries a VQ's keys; switching only the kind works.
  base = {"kind": "identity", "embed_dim": 3, "n_embed": 8192, "ddconfig": {"in_channels": 3, "ch": 128}}
  assert make_first_stage(base, dtype="bfloat16").dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="embed_dim 4 must equal the images' channels"):
    make_first_stage({"kind": "identity", "embed_dim": 4, "ddconfig": {"in_channels": 3}})
  with pytest.raises(ValueError, match=r"unknown first-stage fields \['z_channels'\]"):
    make_first_stage({"kind": "identity", "z_channels": 3})
  with pytest.raises(ValueError, match=r"kind 'kl' needs a ddconfig"):
    make_first_stage({"kind": "kl", "embed_dim": 3})
  model = make_first_stage(IDENTITY)
  with pytest.raises(ValueError, match=r"takes \(B, H, W, 3\) images, got \(1, 4, 4, 4\)"):
    model.apply({}, np.ones((1, 4, 4, 4), np.float32), method=model.encode)


def test_run_copy_round_trip(tmp_path):
  directory = str(tmp_path / "first_stage")
  save_first_stage_copy(directory, {}, IDENTITY, 2.0)
  model, variables, scale, config = load_first_stage_copy(directory)
  assert isinstance(model, IdentityFirstStage) and variables == {} and scale == 2.0 and config == IDENTITY
  assert copy_differs(directory, {}, IDENTITY, 2.0) is None
  assert copy_differs(directory, {}, IDENTITY, 1.0).startswith("scale factor")


@pytest.fixture(scope="module")
def pixel_ldm():
  config = load_config("configs/ldm.py:shapes_class,tiny")
  config.data.image_size = 16
  config.first_stage.model = ml_collections.ConfigDict(IDENTITY)
  config.unet.image_size = 16
  fs = random_first_stage(config.first_stage, config.data.image_size)
  assert fs.variables == {}
  model = build_model(config, fs.model_config, 2.0)
  return config, model, {"first_stage": fs.variables}


def test_pixel_space_train_step_and_sampling(pixel_ldm):
  config, model, frozen = pixel_ldm
  assert model.downsample_factor == 1
  rng = np.random.default_rng(2)
  images = jnp.asarray(rng.uniform(-1, 1, size=(4, 16, 16, 3)), jnp.float32)
  batch = {"image": images, "label": jnp.asarray([0, 5, 17, 30], jnp.int32)}
  # The diffused "latent" is the scaled image itself, with no posterior noise.
  z = ldm_step.latents_of(model, batch, frozen, jnp.asarray(rng.normal(size=images.shape), jnp.float32))
  np.testing.assert_allclose(np.asarray(z), 2.0 * np.asarray(images), rtol=0, atol=0)

  tx = optax.adam(3e-3)
  cfg = dataclasses.replace(step_config(config), ema_decay=0.0)
  init = ldm_step.make_init_fn(model, tx, cfg, example_inputs(model, config), frozen, (1, 16, 16, 3))
  state = jax.jit(init)(jax.random.key(0))
  step = jax.jit(ldm_step.make_train_step(model, schedule_from_config(config.diffusion), tx, cfg))
  before = jax.tree.leaves(state.params)
  state, metrics = step(state, batch, jax.random.key(3), frozen)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
  assert any(not np.array_equal(a, b) for a, b in zip(before, jax.tree.leaves(state.params)))

  pipeline = LDMPipeline(model, state.params, frozen, schedule_from_config(config.diffusion),
                         image_size=16, prediction_type=config.diffusion.prediction_type)
  out = pipeline.class_to_image([3, 8], sampler=pipeline.sampler_config(num_steps=2), seed=0)
  assert out.shape == (2, 16, 16, 3) and out.dtype == np.uint8
  # Decoding is the identity: the sampler's last latent / scale, clipped, is the image.
  assert out.std() > 0
