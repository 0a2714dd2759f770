"""The device mesh, built from ``config.mesh``.

Axes: ``data`` (pure data parallel), ``fsdp`` (data parallel with sharded
parameters and optimiser state), ``tensor`` (model parallel attention / MLP
weights). One size may be -1 to take the remaining devices. On multi-slice
TPU (or several GPU hosts) ``dcn_shape`` gives the per-axis split across
slices/hosts, and the mesh is built with ``create_hybrid_device_mesh`` so
that only the axes that need it cross the slower network.
"""

from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
# Activations' batch dimension is split over both data-parallel axes.
BATCH_AXES = ("data", "fsdp")


def default_mesh_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      dict(
          shape=(-1, 1, 1),  # sizes of (data, fsdp, tensor); one -1 fills.
          dcn_shape=(),  # per-axis split across slices/hosts, e.g. (2, 1, 1).
          # Auto lets XLA propagate shardings from jit in/out shardings; our
          # models carry no sharding annotations, which Explicit would need.
          axis_type="auto",
          fsdp_min_size=2**16,  # parameters with fewer elements replicate.
          rules=(),  # extra (regex, spec) pairs, e.g. (("label_emb", (None, "fsdp")),)
          # CPU-only hosts: split the CPU into this many JAX devices (0: JAX's one), so
          # that the data-parallel step runs one shard per core. Small convolutions
          # hardly use a second core inside one device (see setup_runtime).
          cpu_devices=0,
      )
  )


def resolve_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fills one -1 so the product is ``num_devices``; names sizes on error."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(AXES):
    raise ValueError(f"mesh.shape {shape} must give one size per axis {AXES}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh.shape {shape} has more than one -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if num_devices % known:
      raise ValueError(
          f"mesh.shape {shape}: {num_devices} devices are not divisible by the fixed sizes' product {known}"
      )
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if int(np.prod(shape)) != num_devices:
    raise ValueError(
        f"mesh.shape {dict(zip(AXES, shape))} needs {int(np.prod(shape))} devices but {num_devices} are available"
    )
  return shape


def make_mesh(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the ``(data, fsdp, tensor)`` mesh over all (or the given) devices."""
  devices = list(devices if devices is not None else jax.devices())
  shape = resolve_shape(config.shape, len(devices))
  axis_type = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}[config.get("axis_type", "auto")]
  dcn = tuple(config.get("dcn_shape", ()) or ())
  num_slices = len({getattr(d, "slice_index", 0) for d in devices})
  if not dcn and num_slices > 1:
    # Multi-slice TPU: by default only the data axis crosses slices (DCN).
    if shape[0] % num_slices:
      raise ValueError(
          f"mesh.shape {dict(zip(AXES, shape))}: the data axis ({shape[0]}) must be a multiple of the "
          f"{num_slices} slices, or set mesh.dcn_shape"
      )
    dcn = (num_slices, 1, 1)
  if dcn and int(np.prod(dcn)) > 1:
    if len(dcn) != len(AXES) or any(s % d for s, d in zip(shape, dcn)):
      raise ValueError(f"mesh.dcn_shape {dcn} must divide mesh.shape {shape} axis by axis")
    ici = tuple(s // d for s, d in zip(shape, dcn))
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  else:
    try:
      grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
      grid = np.asarray(devices).reshape(shape)  # e.g. fake CPU devices
  return Mesh(grid, AXES, axis_types=(axis_type,) * len(AXES))


def data_parallel_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Every (given) device on the ``data`` axis: the default mesh for sampling."""
  return make_mesh(default_mesh_config(), devices)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) dimension split over the data-parallel axes."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def check_batch_size(global_batch_size: int, mesh: Mesh, what: str = "train.batch_size") -> None:
  """Fails at start when the batch cannot be split evenly over the mesh."""
  dp = data_parallel_size(mesh)
  if global_batch_size % dp:
    raise ValueError(
        f"{what}={global_batch_size} is not divisible by the data-parallel size {dp} "
        f"(mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})"
    )
  if global_batch_size % jax.process_count():
    raise ValueError(f"{what}={global_batch_size} is not divisible by the process count {jax.process_count()}")
