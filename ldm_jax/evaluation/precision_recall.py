"""Improved precision and recall (Kynkäänniemi et al., 2019) with k-NN manifolds.

Each set's manifold is the union of balls around its points, the radius of a
point being the distance to its k-th nearest *other* point of the same set
(k = 3). Precision is the fraction of generated samples inside the real
manifold; recall the fraction of real samples inside the generated one.
Squared distances are computed on device in row batches (float32, as the
reference), so 50k x 50k comparisons never materialise at once.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.evaluation.statistics import as_feature_matrix


@jax.jit
def _squared_distances(x_BxD: jax.Array, y_NxD: jax.Array) -> jax.Array:
  dot = jnp.matmul(x_BxD, y_NxD.T, precision=jax.lax.Precision.HIGHEST)
  d = jnp.sum(x_BxD**2, 1)[:, None] - 2.0 * dot + jnp.sum(y_NxD**2, 1)[None, :]
  return jnp.maximum(d, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _kth_neighbour_batch(x_BxD, y_NxD, k: int):
  # Index k of the k+1 smallest: index 0 is the point itself (distance 0).
  smallest = -jax.lax.top_k(-_squared_distances(x_BxD, y_NxD), k + 1)[0]
  return smallest[:, k]


@jax.jit
def _inside_any_ball_batch(x_BxD, y_NxD, radii_N):
  return jnp.any(_squared_distances(x_BxD, y_NxD) <= radii_N[None, :], axis=1)


def _map_row_batches(fn, x_NxD: np.ndarray, batch_size: int, *args) -> np.ndarray:
  """Applies ``fn(rows, *args)`` to fixed-size row batches (the last one padded)."""
  n = x_NxD.shape[0]
  out = []
  for lo in range(0, n, batch_size):
    rows = x_NxD[lo: lo + batch_size]
    pad = min(batch_size, n) - rows.shape[0]
    if pad:
      rows = np.concatenate([rows, np.repeat(rows[-1:], pad, axis=0)])
    out.append(np.asarray(fn(rows, *args))[: rows.shape[0] - pad])
  return np.concatenate(out)


def knn_radii(features_NxD, k: int = 3, batch_size: int = 1024) -> np.ndarray:
  """Squared distance from each point to its k-th nearest other point of the set."""
  x = as_feature_matrix(features_NxD).astype(np.float32)
  if not 1 <= k < x.shape[0]:
    raise ValueError(f"k must be between 1 and num_samples - 1 = {x.shape[0] - 1}, got {k}")
  y = jnp.asarray(x)
  return _map_row_batches(lambda rows: _kth_neighbour_batch(rows, y, k), x, batch_size)


def fraction_inside_manifold(query_QxD, manifold_NxD, radii_N, batch_size: int = 1024) -> float:
  """Fraction of ``query`` points within ``radii`` (squared) of some manifold point."""
  q = as_feature_matrix(query_QxD, "query").astype(np.float32)
  m = as_feature_matrix(manifold_NxD, "manifold").astype(np.float32)
  if q.shape[1] != m.shape[1]:
    raise ValueError(f"feature dimensions differ: {q.shape[1]} vs {m.shape[1]}")
  m_dev, r_dev = jnp.asarray(m), jnp.asarray(radii_N, jnp.float32)
  inside = _map_row_batches(lambda rows: _inside_any_ball_batch(rows, m_dev, r_dev), q, batch_size)
  return float(inside.mean())


def precision_recall(real_NxD, fake_MxD, k: int = 3, batch_size: int = 1024) -> tuple[float, float]:
  """``(precision, recall)`` of generated features against real ones."""
  precision = fraction_inside_manifold(fake_MxD, real_NxD, knn_radii(real_NxD, k, batch_size), batch_size)
  recall = fraction_inside_manifold(real_NxD, fake_MxD, knn_radii(fake_MxD, k, batch_size), batch_size)
  return precision, recall
