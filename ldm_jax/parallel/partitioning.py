"""How every parameter and optimiser-state array is laid out on the mesh.

All rules live here and act on parameter paths and shapes, so the models
carry no sharding annotations:

1. explicit rules: ``(regex, spec)`` pairs matched against the ``/``-joined
   path (config ``mesh.rules`` first, then :data:`TENSOR_RULES`, which split
   attention and MLP weights over the ``tensor`` axis Megatron-style);
2. FSDP: any remaining array with at least ``fsdp_min_size`` elements is
   split over ``fsdp`` along its largest dimension divisible by the axis size;
3. everything else (biases, norms, scalars) is replicated.

Optimiser moments and EMA copies have the same shapes and paths ending in the
parameter's path, so one function lays out the whole train state.
"""

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# Column-parallel (output dim) and row-parallel (input dim) projections of
# attention and feed-forward blocks, in our (reference-mirroring) names.
TENSOR_RULES: tuple[tuple[str, tuple], ...] = (
    (r"(to_q|to_k|to_v|q_proj|k_proj|v_proj|fc1|ff/net_0/proj)/kernel$", (None, "tensor")),
    (r"(to_q|to_k|to_v|q_proj|k_proj|v_proj|fc1|ff/net_0/proj)/bias$", ("tensor",)),
    (r"(to_out_0|out_proj|fc2|ff/net_2)/kernel$", ("tensor", None)),
)


class PartitionError(ValueError):
  """A parameter that no rule can lay out on this mesh."""


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _fits(shape: Sequence[int], spec: Sequence, mesh: Mesh) -> bool:
  if len(spec) > len(shape):
    return False
  for dim, axis in zip(shape[len(shape) - len(spec):], spec):
    if axis is not None and dim % mesh.shape[axis]:
      return False
  return True


def spec_for(
    path: str,
    shape: Sequence[int],
    mesh: Mesh,
    *,
    fsdp_min_size: int = 2**16,
    rules: Sequence[tuple[str, Sequence]] = (),
) -> P:
  """The PartitionSpec of one array (rule specs align with trailing dims)."""
  ndim = len(shape)
  spec: list = [None] * ndim
  for pattern, rule in (*rules, *TENSOR_RULES):
    if re.search(pattern, path):
      if any(a is not None and mesh.shape.get(a, 1) > 1 for a in rule) and _fits(shape, rule, mesh):
        spec[ndim - len(rule):] = list(rule)
      break
  fsdp = mesh.shape.get("fsdp", 1)
  if fsdp > 1 and int(np.prod(shape)) >= fsdp_min_size and "fsdp" not in spec:
    free = [d for d in range(ndim) if spec[d] is None and shape[d] % fsdp == 0]
    if not free:
      raise PartitionError(
          f"parameter {path} of shape {tuple(shape)} has no dimension divisible by the fsdp axis size "
          f"{fsdp}; add a rule to mesh.rules or raise mesh.fsdp_min_size above {int(np.prod(shape))}"
      )
    spec[max(free, key=lambda d: shape[d])] = "fsdp"
  return P(*spec)


def state_shardings(abstract_state: Any, mesh: Mesh, *, fsdp_min_size: int = 2**16, rules=()) -> Any:
  """NamedShardings for every leaf of a (abstract) state pytree."""

  def one(path, leaf):
    shape = getattr(leaf, "shape", ())
    return NamedSharding(mesh, spec_for(_path_str(path), shape, mesh, fsdp_min_size=fsdp_min_size, rules=rules))

  return jax.tree_util.tree_map_with_path(one, abstract_state)


def describe(params: Any, shardings: Any) -> str:
  """A table of the largest parameters and how they are split (for logs)."""
  flat_p = traverse_util.flatten_dict(params, sep="/")
  flat_s = traverse_util.flatten_dict(shardings, sep="/")
  rows = sorted(flat_p.items(), key=lambda kv: -int(np.prod(kv[1].shape)))[:12]
  return "\n".join(f"  {k:70s} {str(tuple(v.shape)):22s} {flat_s[k].spec}" for k, v in rows)
