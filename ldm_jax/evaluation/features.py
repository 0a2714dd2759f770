"""Feature extraction over image batches, jitted with the batch split over a mesh.

A feature network ``fn(variables, images) -> array or dict of arrays`` (e.g.
``InceptionV3(...).apply``) runs with its variables replicated and the batch
sharded over every device of the mesh. Batches are padded up to a multiple of
the device count, and up to the largest batch seen so far so that a short
last batch does not recompile; the padding rows are dropped from the result.

Single-process: results come back to this host as NumPy arrays.
"""

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ldm_jax.evaluation.statistics import RunningStatistics

FeatureFn = Callable[[Any, jax.Array], Any]


def data_parallel_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A one-axis ``("data",)`` mesh over all (or the given) devices."""
  devices = devices if devices is not None else jax.devices()
  return Mesh(np.asarray(devices), ("data",), axis_types=(AxisType.Auto,))


class ShardedFeatureExtractor:
  """Calls ``fn(variables, images)`` with ``images`` split over all devices of ``mesh``."""

  def __init__(self, fn: FeatureFn, variables: Any, mesh: Mesh | None = None) -> None:
    self.mesh = mesh if mesh is not None else data_parallel_mesh()
    # The batch is split over every mesh axis jointly, i.e. over all devices.
    self._batch = NamedSharding(self.mesh, P(tuple(self.mesh.axis_names)))
    replicated = NamedSharding(self.mesh, P())
    self._variables = jax.device_put(variables, replicated)
    self._fn = jax.jit(fn, in_shardings=(replicated, self._batch), out_shardings=self._batch)
    self._padded_batch = 0

  @property
  def num_shards(self) -> int:
    return self.mesh.devices.size

  def __call__(self, images_BxHxWxC) -> Any:
    """Features of one host batch, as NumPy arrays with the batch's length."""
    images = np.asarray(images_BxHxWxC)
    n = images.shape[0]
    if n == 0:
      raise ValueError("empty image batch")
    size = -(-max(n, self._padded_batch) // self.num_shards) * self.num_shards
    self._padded_batch = max(self._padded_batch, size)
    if size > n:
      # Repeat the last image rather than zeros: padding rows stay valid inputs.
      images = np.concatenate([images, np.repeat(images[-1:], size - n, axis=0)])
    out = self._fn(self._variables, jax.device_put(images, self._batch))
    return jax.tree.map(lambda a: np.asarray(a)[:n], out)


def iterate_features(
    extract: Callable[[np.ndarray], Any], batches: Iterable[Any], *, max_samples: int | None = None
) -> Iterator[Any]:
  """Yields ``extract(batch)`` per batch; ``max_samples`` stops early and trims the last batch.

  ``extract`` is a :class:`ShardedFeatureExtractor` or any function of one
  image batch.
  """
  seen = 0
  for batch in batches:
    if max_samples is not None:
      batch = batch[: max_samples - seen]
    if len(batch) == 0:
      return
    yield extract(batch)
    seen += len(batch)
    if max_samples is not None and seen >= max_samples:
      return


def compute_features(
    extract: Callable[[np.ndarray], Any], batches: Iterable[Any], *, max_samples: int | None = None
) -> Any:
  """All features of ``batches``, concatenated (NumPy, same structure as ``extract``'s output)."""
  pieces = list(iterate_features(extract, batches, max_samples=max_samples))
  if not pieces:
    raise ValueError("no image batches to extract features from")
  return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *pieces)


def accumulate_statistics(
    extract: Callable[[np.ndarray], Any], batches: Iterable[Any], *, key: str | None = None,
    max_samples: int | None = None,
) -> RunningStatistics:
  """Streams FID statistics without keeping the features: ``key`` picks one output of a dict."""
  stats = RunningStatistics()
  for out in iterate_features(extract, batches, max_samples=max_samples):
    stats.update(out[key] if key is not None else out)
  if stats.count == 0:
    raise ValueError("no image batches to extract features from")
  return stats
