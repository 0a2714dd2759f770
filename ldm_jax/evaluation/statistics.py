"""FID statistics: the feature mean and covariance, accumulated and stored.

Features are computed on device batch by batch; their moments are merged on
the host in float64 with the pairwise (Chan et al.) update, which stays
accurate where a running sum of squares would cancel catastrophically.
Reference statistics are ``.npz`` files with keys ``mu`` and ``sigma``, the
layout pytorch-fid, torch-fidelity and the TF FID code use.
"""

import os

import numpy as np


def as_feature_matrix(x, name: str = "features") -> np.ndarray:
  """Checks and returns a finite float64 ``(num_samples, dim)`` array."""
  x = np.asarray(x, np.float64)
  if x.ndim != 2:
    raise ValueError(f"{name} must be a (num_samples, dim) array, got shape {x.shape}")
  if not np.isfinite(x).all():
    raise ValueError(f"{name} contains NaN or infinite values")
  return x


class RunningStatistics:
  """Mean and covariance (``np.cov`` convention, ddof=1) of streamed feature batches."""

  def __init__(self) -> None:
    self.count = 0
    self._mean: np.ndarray | None = None
    self._m2: np.ndarray | None = None  # sum of outer products of deviations from the mean

  def update(self, features_BxD) -> "RunningStatistics":
    x = as_feature_matrix(features_BxD)
    n = x.shape[0]
    if n == 0:
      return self
    mean = x.mean(axis=0)
    centered = x - mean
    m2 = centered.T @ centered
    if self._mean is None:
      self.count, self._mean, self._m2 = n, mean, m2
      return self
    if x.shape[1] != self._mean.shape[0]:
      raise ValueError(f"feature dimension changed from {self._mean.shape[0]} to {x.shape[1]}")
    total = self.count + n
    delta = mean - self._mean
    self._mean = self._mean + delta * (n / total)
    self._m2 = self._m2 + m2 + np.outer(delta, delta) * (self.count * n / total)
    self.count = total
    return self

  @property
  def mean(self) -> np.ndarray:
    if self._mean is None:
      raise ValueError("no features accumulated yet")
    return self._mean

  @property
  def covariance(self) -> np.ndarray:
    if self.count < 2:
      raise ValueError(f"need at least 2 samples for a covariance, got {self.count}")
    return self._m2 / (self.count - 1)


def mean_and_covariance(features_NxD) -> tuple[np.ndarray, np.ndarray]:
  """One-shot ``(mu, sigma)`` of a feature matrix, in float64."""
  stats = RunningStatistics().update(features_NxD)
  return stats.mean, stats.covariance


def save_statistics(path: str, mu: np.ndarray, sigma: np.ndarray) -> None:
  """Writes ``mu`` (D,) and ``sigma`` (D, D) to an ``.npz`` file."""
  mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  _check_statistics(mu, sigma, path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez(path, mu=mu, sigma=sigma)


def load_statistics(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads ``(mu, sigma)`` from an ``.npz`` file written by us or by pytorch-fid."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"FID statistics file not found: {path}")
  with np.load(path, allow_pickle=False) as f:
    missing = [k for k in ("mu", "sigma") if k not in f.files]
    if missing:
      raise KeyError(f"{path} lacks {missing}; FID statistics files hold 'mu' and 'sigma' (it has {f.files})")
    mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
  _check_statistics(mu, sigma, path)
  return mu, sigma


def _check_statistics(mu: np.ndarray, sigma: np.ndarray, where: str) -> None:
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"{where}: mu must be (D,) and sigma (D, D); got {mu.shape} and {sigma.shape}")
