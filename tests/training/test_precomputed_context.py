"""A frozen text encoder's outputs stored with precomputed latents (precompute_latents.py --with_context) train
exactly as the tokens they were computed from, classifier-free-guidance dropout included: dropped rows get the
empty caption's encoding."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldm_jax.assembly import build_model, example_inputs, random_first_stage, schedule_from_config, step_config
from ldm_jax.config import load_config
from ldm_jax.data.tokenizers import build_shapes_tokenizer, tokenize
from ldm_jax.interop.cond_stage import cond_stage_variables
from ldm_jax.training import ldm_step

CAPTIONS = ["a large red circle", "a small blue square", "a large green star", "a small yellow triangle"]


def test_stored_context_gives_the_step_of_its_tokens():
  config = load_config("configs/ldm.py:shapes_txt2img,tiny")
  config.cond_stage = dict(kind="clip", preset="sd_v1", hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                           num_attention_heads=2, vocab_size=64, max_position_embeddings=16)
  config.diffusion.cond_dropout = 0.5
  tokenizer = build_shapes_tokenizer()
  variables, fs_config, scale = random_first_stage(config.first_stage, config.data.image_size)
  model = build_model(config, fs_config, scale, tokenizer)
  assert not model.cond_stage.trainable
  tokens, _ = tokenize(tokenizer, CAPTIONS, config.data.tokenizer.max_length)
  cond = cond_stage_variables(model.cond_stage, jax.random.key(3), tokens)
  frozen = {"first_stage": variables, "cond": cond}
  rng = np.random.default_rng(2)
  latents = {"latent_mean": jnp.asarray(rng.normal(size=(4, 8, 8, 3)), jnp.float32),
             "latent_logvar": jnp.asarray(rng.uniform(-6, -2, size=(4, 8, 8, 3)), jnp.float32)}
  context = model.cond_stage.encode(cond, jnp.asarray(tokens))

  cfg = step_config(config)
  tx = optax.adam(1e-3)
  side = config.data.image_size // model.downsample_factor
  init = ldm_step.make_init_fn(model, tx, cfg, example_inputs(model, config), frozen, (1, side, side, 3))
  state = jax.jit(init)(jax.random.key(0))
  step = jax.jit(ldm_step.make_train_step(model, schedule_from_config(config.diffusion), tx, cfg))
  host = {**latents, "context": np.asarray(context), "tokens": tokens}
  assert set(model.host_inputs(host)) == {"context"}  # the tokens are not encoded again

  dropped = []
  for seed in range(2):  # dropout draws with some rows dropped and some kept (checked below)
    key = jax.random.key(seed)
    draws = ldm_step.draw_randomness(model, cfg, jax.random.split(key)[0], latents, 1000)
    dropped += np.asarray(draws["drop"]).tolist()
    by_tokens, m_tokens = step(state, {**latents, "tokens": jnp.asarray(tokens)}, key, frozen)
    by_context, m_context = step(state, {**latents, "context": context}, key, frozen)
    np.testing.assert_allclose(m_context["loss"], m_tokens["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(by_context.params), jax.tree.leaves(by_tokens.params)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert 0 < sum(dropped) < len(dropped)
