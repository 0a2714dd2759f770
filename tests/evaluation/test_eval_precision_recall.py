"""Improved precision/recall on point clouds with known answers and against brute force."""

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from ldm_jax.evaluation import precision_recall as pr


def _cloud(rng, n, d, center):
  return rng.normal(size=(n, d)) + center


def test_identical_sets_give_one_and_one():
  x = _cloud(np.random.default_rng(0), 150, 8, 0.0)
  assert pr.precision_recall(x, x.copy(), batch_size=64) == (1.0, 1.0)


def test_far_apart_clusters_give_zero_and_zero():
  rng = np.random.default_rng(1)
  assert pr.precision_recall(_cloud(rng, 100, 8, 0.0), _cloud(rng, 120, 8, 100.0), batch_size=64) == (0.0, 0.0)


def test_generated_subset_has_full_precision_and_partial_recall():
  rng = np.random.default_rng(2)
  real = np.concatenate([_cloud(rng, 90, 6, 0.0), _cloud(rng, 30, 6, 80.0)])
  fake = real[:90].copy()  # mode-dropping generator: only the first cluster
  precision, recall = pr.precision_recall(real, fake, batch_size=32)
  assert precision == 1.0
  assert recall == pytest.approx(0.75)


def _brute_force(real, fake, k):
  def radii(x):
    return np.sort(cdist(x, x, "sqeuclidean"), axis=1)[:, k]

  def inside(q, m):
    return np.mean((cdist(q, m, "sqeuclidean") <= radii(m)[None]).any(axis=1))

  return inside(fake, real), inside(real, fake)


@pytest.mark.parametrize("k", [3, 5])
def test_matches_float64_brute_force_on_overlapping_clouds(k):
  rng = np.random.default_rng(3 + k)
  real, fake = _cloud(rng, 157, 5, 0.0), _cloud(rng, 131, 5, 1.5) * 1.3
  got = pr.precision_recall(real, fake, k=k, batch_size=40)  # several row batches, the last one padded
  expected = _brute_force(real, fake, k)
  np.testing.assert_allclose(got, expected, atol=1e-12)
  assert 0.05 < got[0] < 0.95 and 0.05 < got[1] < 0.95  # a non-trivial case


def test_knn_radii_and_errors():
  rng = np.random.default_rng(9)
  x = rng.normal(size=(30, 4))
  np.testing.assert_allclose(pr.knn_radii(x, k=3, batch_size=7), np.sort(cdist(x, x, "sqeuclidean"), 1)[:, 3],
                             rtol=1e-5)
  with pytest.raises(ValueError, match="k must be between"):
    pr.knn_radii(x, k=30)
  with pytest.raises(ValueError, match="feature dimensions differ"):
    pr.precision_recall(x, rng.normal(size=(30, 5)))
