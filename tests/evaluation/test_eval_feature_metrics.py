"""FID, KID, IS and FID statistics against independent float64 NumPy/SciPy computations."""

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import scipy.stats

from ldm_jax.evaluation import feature_metrics as fm
from ldm_jax.evaluation import statistics as st


def _frechet_by_eigen(mu1, s1, mu2, s2):
  """Tr sqrt(s1 s2) as the sum of sqrt eigenvalues of the PSD s1^1/2 s2 s1^1/2."""
  w, v = np.linalg.eigh(s1)
  half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  inner = half @ s2 @ half
  eig = np.linalg.eigvalsh((inner + inner.T) / 2)
  d = mu1 - mu2
  return d @ d + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig, 0, None)).sum()


def _features(rng, n, d, scale=1.0, shift=0.0):
  return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * scale + shift


@pytest.mark.parametrize("n,d", [(400, 16), (20, 32), (12, 64)])  # the last two: fewer samples than dimensions
def test_frechet_distance_matches_eigen_formula(n, d):
  rng = np.random.default_rng(n * d)
  mu1, s1 = st.mean_and_covariance(_features(rng, n, d, 0.3))
  mu2, s2 = st.mean_and_covariance(_features(rng, n, d, 0.5, shift=0.2))
  got = fm.frechet_distance(mu1, s1, mu2, s2)
  np.testing.assert_allclose(got, _frechet_by_eigen(mu1, s1, mu2, s2), rtol=1e-6)


def test_frechet_distance_of_identical_statistics_is_zero():
  rng = np.random.default_rng(1)
  mu, s = st.mean_and_covariance(_features(rng, 300, 8))
  assert abs(fm.frechet_distance(mu, s, mu, s)) < 1e-9


def test_frechet_distance_retries_with_diagonal_offset(monkeypatch):
  rng = np.random.default_rng(2)
  mu1, s1 = st.mean_and_covariance(_features(rng, 10, 24))
  mu2, s2 = st.mean_and_covariance(_features(rng, 10, 24))
  real_sqrtm, calls = scipy.linalg.sqrtm, []

  def sqrtm_failing_once(a):  # what scipy returns for a numerically singular product
    calls.append(a)
    return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

  monkeypatch.setattr(scipy.linalg, "sqrtm", sqrtm_failing_once)
  got = fm.frechet_distance(mu1, s1, mu2, s2, eps=1e-3)
  eye = np.eye(24) * 1e-3
  np.testing.assert_allclose(calls[1], (s1 + eye) @ (s2 + eye), rtol=1e-12)
  # The offset enters sqrt(s1 s2) only: the traces stay those of the originals.
  expected = _frechet_by_eigen(mu1, s1 + eye, mu2, s2 + eye) - 2 * 24 * 1e-3
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_frechet_distance_rejects_large_imaginary_component():
  mu = np.array([0.3, -0.2])
  with pytest.raises(ValueError, match="imaginary component"):
    fm.frechet_distance(mu, np.diag([1.0, -1.0]), mu, np.eye(2))
  with pytest.raises(ValueError, match="mean vectors differ"):
    fm.frechet_distance(np.ones(3), np.eye(3), np.ones(2), np.eye(2))


def _kid_reference(a, b, num_subsets, subset_size, seed):
  rng = np.random.RandomState(seed)
  mmds = []
  for _ in range(num_subsets):
    x = a[rng.choice(len(a), subset_size, replace=False)]
    y = b[rng.choice(len(b), subset_size, replace=False)]
    k = lambda u, v: (np.einsum("id,jd->ij", u, v) / u.shape[1] + 1.0) ** 3  # noqa: E731
    off = ~np.eye(subset_size, dtype=bool)
    mmds.append(k(x, x)[off].mean() + k(y, y)[off].mean() - 2 * k(x, y).mean())
  return np.mean(mmds), np.std(mmds)


def test_kid_matches_explicit_pairwise_estimator():
  rng = np.random.default_rng(3)
  a, b = rng.normal(size=(120, 10)), rng.normal(size=(90, 10)) * 1.3 + 0.2
  got = fm.kernel_inception_distance(a, b, num_subsets=7, subset_size=50, seed=11)
  np.testing.assert_allclose(got, _kid_reference(a, b, 7, 50, 11), rtol=1e-10)
  assert got[0] > 0.01  # clearly different distributions


def test_kid_rejects_too_large_subset():
  rng = np.random.default_rng(4)
  with pytest.raises(ValueError, match="subset_size 1000"):
    fm.kernel_inception_distance(rng.normal(size=(50, 4)), rng.normal(size=(60, 4)))


def test_inception_score_matches_kl_by_scipy():
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(103, 12)) * 3
  got = fm.inception_score(logits, splits=4, shuffle_seed=7)
  shuffled = logits[np.random.RandomState(7).permutation(103)]
  scores = []
  for i in range(4):
    p = scipy.special.softmax(shuffled[i * 103 // 4: (i + 1) * 103 // 4], axis=1)
    marginal = p.mean(axis=0)
    scores.append(np.exp(np.mean([scipy.stats.entropy(row, marginal) for row in p])))
  np.testing.assert_allclose(got, (np.mean(scores), np.std(scores)), rtol=1e-10)


def test_inception_score_closed_forms():
  rng = np.random.default_rng(6)
  # Confident predictions spread evenly over C classes: IS = C.
  confident = 60.0 * np.eye(10)[np.arange(200) % 10] + rng.normal(size=(200, 10)) * 0.01
  np.testing.assert_allclose(fm.inception_score(confident, splits=1, shuffle_seed=None)[0], 10.0, rtol=1e-6)
  # Uniform predictions (each row constant): IS = 1.
  flat = np.repeat(rng.normal(size=(50, 1)), 7, axis=1)
  np.testing.assert_allclose(fm.inception_score(flat, splits=5), (1.0, 0.0), atol=1e-12)


def test_running_statistics_equal_one_shot_numpy():
  rng = np.random.default_rng(7)
  # A large common offset: a naive sum-of-squares accumulation loses digits here.
  feats = rng.normal(size=(517, 9)) @ rng.normal(size=(9, 9)) + 1e4
  stats = st.RunningStatistics()
  for lo, hi in [(0, 1), (1, 64), (64, 200), (200, 201), (201, 517)]:
    stats.update(feats[lo:hi])
  assert stats.count == 517
  np.testing.assert_allclose(stats.mean, feats.mean(axis=0), rtol=1e-13)
  np.testing.assert_allclose(stats.covariance, np.cov(feats, rowvar=False), rtol=1e-9, atol=1e-9)


def test_statistics_file_round_trip_and_errors(tmp_path):
  rng = np.random.default_rng(8)
  mu, sigma = st.mean_and_covariance(rng.normal(size=(40, 5)))
  path = str(tmp_path / "ref_stats.npz")
  st.save_statistics(path, mu, sigma)
  with np.load(path) as f:
    assert sorted(f.files) == ["mu", "sigma"]
  loaded = st.load_statistics(path)
  np.testing.assert_array_equal(loaded[0], mu)
  np.testing.assert_array_equal(loaded[1], sigma)
  np.savez(tmp_path / "bad.npz", mean=mu)
  with pytest.raises(KeyError, match="'mu' and 'sigma'"):
    st.load_statistics(str(tmp_path / "bad.npz"))
  with pytest.raises(FileNotFoundError, match="missing.npz"):
    st.load_statistics(str(tmp_path / "missing.npz"))
  with pytest.raises(ValueError, match="NaN"):
    st.RunningStatistics().update(np.full((3, 2), np.nan))
