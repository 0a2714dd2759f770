"""Metrics on Inception outputs, in float64 NumPy on the host: FID, KID, IS.

These follow the reference implementations number for number:
``frechet_distance`` is pytorch-fid's ``calculate_frechet_distance``;
``kernel_inception_distance`` and ``inception_score`` are torch-fidelity's
(same subset sampling and shuffling for the same seed).
"""

import logging

import numpy as np

from ldm_jax.evaluation.statistics import as_feature_matrix

# torch-fidelity's default seed, so that KID / IS subsets match it.
DEFAULT_SEED = 2020


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

  ``|mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2))`` with
  ``scipy.linalg.sqrtm``. If the product is singular enough that the square
  root is not finite (fewer samples than dimensions), ``eps`` is added to both
  diagonals and the root retried. A numerically complex root is accepted when
  its diagonal's imaginary part is within 1e-3 of zero and rejected otherwise.
  """
  try:
    from scipy import linalg
  except ImportError as e:  # scipy is a test extra of the package, not a core dependency.
    raise ImportError("frechet_distance needs scipy (pip install scipy)") from e
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape:
    raise ValueError(f"mean vectors differ in length: {mu1.shape} vs {mu2.shape}")
  if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
    raise ValueError(f"covariances {sigma1.shape}, {sigma2.shape} do not match mean dimension {mu1.shape[0]}")

  covmean = linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    logging.warning("Fréchet distance: singular product; adding %g to the covariance diagonals", eps)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(
          f"Fréchet distance: sqrt(sigma1 @ sigma2) has an imaginary component of up to "
          f"{np.max(np.abs(covmean.imag)):.3g}; the covariances are not valid (PSD) or far too few samples were used"
      )
    covmean = covmean.real
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def polynomial_kernel(x_NxD: np.ndarray, y_MxD: np.ndarray, degree: int = 3, coef0: float = 1.0) -> np.ndarray:
  """``(x . y / D + coef0) ** degree``, KID's kernel."""
  return (x_NxD @ y_MxD.T / x_NxD.shape[1] + coef0) ** degree


def mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
  """Unbiased MMD^2 of two equal-size samples from their kernel matrices.

  The within-set terms leave the diagonal out (``m (m - 1)`` pairs); the
  cross term averages all ``m^2`` pairs, as in Binkowski et al. / torch-fidelity.
  """
  m = k_xx.shape[0]
  within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
  return float(within - 2.0 * k_xy.sum() / (m * m))


def kernel_inception_distance(
    features_a_NxD, features_b_MxD, *, num_subsets: int = 100, subset_size: int = 1000,
    degree: int = 3, coef0: float = 1.0, seed: int = DEFAULT_SEED,
) -> tuple[float, float]:
  """KID: mean and std of the unbiased polynomial-kernel MMD^2 over random subsets.

  Each subset draws ``subset_size`` samples without replacement from each
  set (from ``a`` first, then ``b``, with ``np.random.RandomState(seed)``).
  """
  a, b = as_feature_matrix(features_a_NxD, "features_a"), as_feature_matrix(features_b_MxD, "features_b")
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
  if subset_size < 2 or subset_size > min(len(a), len(b)):
    raise ValueError(
        f"KID subset_size {subset_size} must be in [2, min(num samples)] = [2, {min(len(a), len(b))}]; "
        "pass a smaller subset_size or more samples"
    )
  rng = np.random.RandomState(seed)
  mmds = np.empty(num_subsets)
  for i in range(num_subsets):
    x = a[rng.choice(len(a), subset_size, replace=False)]
    y = b[rng.choice(len(b), subset_size, replace=False)]
    kernel = lambda u, v: polynomial_kernel(u, v, degree, coef0)  # noqa: E731
    mmds[i] = mmd2_unbiased(kernel(x, x), kernel(x, y), kernel(y, y))
  return float(mmds.mean()), float(mmds.std())


def inception_score(logits_NxC, *, splits: int = 10, shuffle_seed: int | None = DEFAULT_SEED) -> tuple[float, float]:
  """Inception Score: mean and std over ``splits`` of ``exp(E_x KL(p(y|x) || p(y)))``.

  Pass the Inception's ``logits_unbiased`` to match the original IS code and
  torch-fidelity. Split ``i`` is rows ``[i N // splits, (i + 1) N // splits)``
  after shuffling with ``RandomState(shuffle_seed).permutation`` (``None``:
  no shuffling, as the original code).
  """
  logits = as_feature_matrix(logits_NxC, "logits")
  n = len(logits)
  if not 1 <= splits <= n:
    raise ValueError(f"splits must be between 1 and the number of samples ({n}), got {splits}")
  if shuffle_seed is not None:
    logits = logits[np.random.RandomState(shuffle_seed).permutation(n)]
  shifted = logits - logits.max(axis=1, keepdims=True)
  log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  p = np.exp(log_p)
  scores = []
  for i in range(splits):
    lo, hi = i * n // splits, (i + 1) * n // splits
    log_marginal = np.log(p[lo:hi].mean(axis=0, keepdims=True))
    scores.append(np.exp((p[lo:hi] * (log_p[lo:hi] - log_marginal)).sum(axis=1).mean()))
  return float(np.mean(scores)), float(np.std(scores))
