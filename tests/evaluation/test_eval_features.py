"""The mesh-sharded feature extractor on 8 fake CPU devices equals a single-device run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.evaluation import clip_image, features, statistics


@pytest.fixture(scope="module")
def embed_and_variables():
  model = clip_image.clip_vision_model("tiny")
  shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: (rng.normal(size=s.shape) * 0.2).astype(np.float32), shapes)
  return clip_image.clip_image_embed_fn(model), variables


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(1).uniform(-1, 1, size=(21, 36, 44, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def single_device(embed_and_variables, images):
  fn, variables = embed_and_variables
  out = jax.jit(fn)(jax.device_put(variables, jax.devices()[0]), jax.device_put(images, jax.devices()[0]))
  assert len(out.devices()) == 1
  return np.asarray(out)


@pytest.fixture(scope="module")
def extract(embed_and_variables):
  return features.ShardedFeatureExtractor(*embed_and_variables)  # all 8 devices


def test_sharded_batches_equal_single_device(extract, images, single_device):
  assert extract.num_shards == len(jax.devices()) == 8
  got = features.compute_features(extract, (images[i: i + 8] for i in range(0, 21, 8)), max_samples=19)
  assert got.shape == (19, 16)
  np.testing.assert_allclose(got, single_device[:19], rtol=1e-5, atol=1e-6)
  # Short batches (the last 3 here, 6 in the other test) are padded to 8: one compilation only.
  assert extract._fn._cache_size() == 1


def test_streamed_statistics_equal_one_shot(extract, images, single_device):
  stats = features.accumulate_statistics(extract, (images[i: i + 6] for i in range(0, 21, 6)))
  assert stats.count == 21
  mu, sigma = statistics.mean_and_covariance(single_device)
  np.testing.assert_allclose(stats.mean, mu, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats.covariance, sigma, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="no image batches"):
    features.compute_features(extract, iter([]))

