"""Stage-2 train step: EMA, condition dropout, consistency checks, overfitting.
(Gradient accumulation and remat changing memory, not results, are checked
on the sharded step in test_sharding.py, against the plain single-device step.)"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ldm_jax.assembly import build_model, example_inputs, random_first_stage, schedule_from_config, step_config
from ldm_jax.config import load_config
from ldm_jax.data.tokenizers import build_shapes_tokenizer, tokenize
from ldm_jax.training import ldm_step
from ldm_jax.training.ema import ema_update

CAPTIONS = ["a large red circle", "a small blue square", "a large green star", "a small yellow triangle"]


@pytest.fixture(scope="module")
def setup():
  config = load_config("configs/ldm.py:shapes_txt2img,tiny")
  tokenizer = build_shapes_tokenizer()
  variables, fs_config, scale = random_first_stage(config.first_stage, config.data.image_size)
  model = build_model(config, fs_config, scale, tokenizer)
  frozen = {"first_stage": variables}
  tokens, _ = tokenize(tokenizer, CAPTIONS, config.data.tokenizer.max_length)
  # Cached posterior moments, as the latent cache feeds them: the compiled
  # step then skips the encoder (keeps these tests fast).
  rng = np.random.default_rng(1)
  batch = {
      "latent_mean": jnp.asarray(rng.normal(size=(4, 8, 8, 3)), jnp.float32),
      "latent_logvar": jnp.asarray(rng.uniform(-6, -2, size=(4, 8, 8, 3)), jnp.float32),
      "tokens": jnp.asarray(tokens),
  }
  return config, tokenizer, model, frozen, batch


_TX = optax.adam(3e-3)


def _state(config, model, frozen, **step_overrides):
  cfg = dataclasses.replace(step_config(config), **step_overrides)
  side = config.data.image_size // model.downsample_factor
  init = ldm_step.make_init_fn(model, _TX, cfg, example_inputs(model, config), frozen, (1, side, side, 3))
  return jax.jit(init)(jax.random.key(0))


def _step(config, model, **step_overrides):
  cfg = dataclasses.replace(step_config(config), **step_overrides)
  return jax.jit(ldm_step.make_train_step(model, schedule_from_config(config.diffusion), _TX, cfg))


def test_ema_matches_hand_computation():
  ema = {"w": jnp.asarray([1.0, -2.0])}
  params = {"w": jnp.asarray([3.0, 4.0])}
  out = ema_update(ema, params, num_updates=1, decay=0.9999)
  d = min(0.9999, 2 / 11)  # warm-up: (1 + n) / (10 + n) at the first update
  np.testing.assert_allclose(out["w"], np.array([1.0, -2.0]) * d + np.array([3.0, 4.0]) * (1 - d), rtol=1e-6)
  late = ema_update(ema, params, num_updates=10**7, decay=0.9999)
  np.testing.assert_allclose(late["w"], np.array([1.0, -2.0]) * 0.9999 + np.array([3.0, 4.0]) * 1e-4, rtol=1e-5)


def test_condition_dropout_rate_and_null_caption(setup):
  config, tokenizer, model, _, batch = setup
  n, p = 20000, 0.1
  tokens = jnp.tile(batch["tokens"][:1], (n, 1))
  drop = jax.random.bernoulli(jax.random.key(3), p, (n,))
  dropped = model.drop_inputs(drop, {"tokens": tokens})["tokens"]
  empty, _ = tokenize(tokenizer, [""], config.data.tokenizer.max_length)
  is_null = np.all(np.asarray(dropped) == empty[0], axis=1)
  np.testing.assert_array_equal(is_null, np.asarray(drop))
  sigma = np.sqrt(p * (1 - p) / n)
  assert abs(is_null.mean() - p) < 4 * sigma
  kept = np.asarray(dropped)[~is_null]
  assert np.all(kept == np.asarray(tokens[0]))


def test_mismatched_pieces_fail_naming_both_values(setup):
  config, tokenizer, _, frozen, _ = setup
  _, fs_config, _ = random_first_stage(config.first_stage, config.data.image_size)
  bad = config.copy_and_resolve_references()
  bad.unet.context_dim = 48
  with pytest.raises(ValueError, match=r"unet.context_dim=48 but the text encoder outputs 32-dim context"):
    build_model(bad, fs_config, 1.0, tokenizer)
  bad = config.copy_and_resolve_references()
  bad.unet.in_channels = 4
  with pytest.raises(ValueError, match=r"unet.in_channels=4 but the first stage gives 3 latent channels"):
    build_model(bad, fs_config, 1.0, tokenizer)
  bad = config.copy_and_resolve_references()
  bad.data.image_size = 30
  with pytest.raises(ValueError, match=r"image size 30 is not divisible by the first stage's downsampling factor 4"):
    build_model(bad, fs_config, 1.0, tokenizer)


def test_configured_timestep_sampling_reaches_the_step(setup):
  config, _, model, _, _ = setup
  logit_normal = config.copy_and_resolve_references()
  logit_normal.diffusion.update(timestep_sampling="logit_normal", timestep_loc=-1.0, timestep_scale=0.5)
  T, n = 1000, 50_000
  big_batch = {"latent_mean": jnp.zeros((n, 1, 1, 1))}  # only its shape is read
  t = np.asarray(ldm_step.draw_randomness(model, step_config(logit_normal), jax.random.key(0), big_batch, T)["t"])
  # sigmoid(-1 + 0.5 n): median T * sigmoid(-1) = 268.9; uniform would put it at 499.5.
  assert abs(np.median(t) - 268.9) < 5
  assert np.mean(t > 500) < 0.03  # P(n > 2) = 2.3%
  logit_normal.diffusion.timestep_sampling = "lognormal"
  with pytest.raises(ValueError, match="unknown timestep_sampling 'lognormal'"):
    step_config(logit_normal)


@pytest.fixture(scope="module")
def plain_step(setup):
  config, _, model, frozen, _ = setup
  return _state(config, model, frozen), _step(config, model, cond_dropout=0.25)


def test_tiny_text_model_overfits_a_small_batch(setup, plain_step):
  _, _, _, frozen, batch = setup
  state, step = plain_step
  losses = []
  for i in range(80):
    state, metrics = step(state, batch, jax.random.key(i % 8), frozen)  # 8 fixed noise draws
    losses.append(float(metrics["loss"]))
  first, last = np.mean(losses[:8]), np.mean(losses[-8:])
  assert last < 0.5 * first, (first, last)
