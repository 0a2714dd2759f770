"""Splitting global batches between processes, and joining them on devices.

With P processes and global batch size G, process p reads positions
``[b*G + p*G/P, b*G + (p+1)*G/P)`` of batch b of the (shuffled, repeated)
global order: the processes' slices of a batch are disjoint and together
are exactly the batch a single process would read.
"""

from __future__ import annotations

from typing import Any, Mapping

import grain
import jax
import numpy as np


class ProcessSlice(grain.MapDataset):
  """This process's share of every global batch, in order."""

  def __init__(self, parent: grain.MapDataset, global_batch_size: int, process_index: int, process_count: int):
    super().__init__(parent)
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"Invalid process_index {process_index} for process_count {process_count}.")
    if global_batch_size < 1 or global_batch_size % process_count:
      raise ValueError(
          f"The global batch size {global_batch_size} must be a positive multiple of the "
          f"number of processes ({process_count})."
      )
    self._global = global_batch_size
    self._local = global_batch_size // process_count
    self._offset = process_index * self._local

  def __len__(self) -> int:
    full_batches, remainder = divmod(len(self._parent), self._global)
    return full_batches * self._local + min(max(remainder - self._offset, 0), self._local)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    batch, position = divmod(index, self._local)
    return self._parent[batch * self._global + self._offset + position]

  def __str__(self) -> str:
    return f"ProcessSlice(offset={self._offset}, local={self._local}, global={self._global})"


def _is_numeric(value: Any) -> bool:
  return isinstance(value, np.ndarray) and (np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_)


def to_global_array(local_batch: Mapping[str, Any], sharding: jax.sharding.Sharding) -> dict[str, Any]:
  """Numeric fields -> one global ``jax.Array`` each, sharded along the batch.

  Each process passes its own slice; ``sharding`` says how the global batch
  is laid out (e.g. ``NamedSharding(mesh, P("data"))``). Text fields such as
  captions stay host-local NumPy arrays.
  """
  return {
      key: jax.make_array_from_process_local_data(sharding, value) if _is_numeric(value) else value
      for key, value in local_batch.items()
  }
