"""Stage-1 training of a VQ autoencoder: loss goes down, codebook metrics,
the scale factor of pre-quantisation latents, loading it back."""

import json
import os

import jax
import numpy as np
import pytest
from test_train_autoencoder import fixed_images, make_config, use_compilation_cache

from ldm_jax.apps.train import train_first_stage as train
from ldm_jax.interop.load import load_first_stage

STEPS = 12


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  use_compilation_cache(tmp_path_factory)
  root = tmp_path_factory.mktemp("ae_vq")
  config = make_config(str(root / "data"), "vq_f4,tiny")
  config.loss.disc_factor = 0.0  # the GAN step is covered by the KL tests
  result = train(config, str(root / "run"))
  with open(root / "run" / "metrics.jsonl") as f:
    metrics = {r["step"]: r for r in map(json.loads, f) if "rec" in r}
  return dict(config=config, root=root, result=result, metrics=metrics)


def test_vq_training_reduces_reconstruction_loss(run):
  m = run["metrics"]
  assert m[STEPS - 1]["rec"] + m[STEPS]["rec"] < 0.75 * (m[1]["rec"] + m[2]["rec"]), m
  n_embed = run["config"].model.n_embed
  for step in (1, STEPS):
    assert 1.0 <= m[step]["perplexity"] <= n_embed and 0 < m[step]["usage"] <= 1.0
    assert np.isfinite(m[step]["codebook"])


def test_vq_scale_factor_and_round_trip(run):
  model, variables, scale, model_config = load_first_stage(run["root"] / "run")
  assert model_config["kind"] == "vq" and model.n_embed == run["config"].model.n_embed
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables["params"]),
               jax.device_get(run["result"].state.params["ae"]))
  images = fixed_images(run["config"], "train", shuffle=True)
  h = np.asarray(model.apply(variables, images, method=model.encode), np.float64)  # pre-quantisation
  np.testing.assert_allclose(scale, 1.0 / h.std(), rtol=1e-5)
  assert os.path.isfile(run["root"] / "run" / "reconstructions" / f"step_{STEPS:06d}.png")
