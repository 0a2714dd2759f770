"""Process-level setup shared by the entry points: logging, distributed
runtime, persistent compilation cache."""

import logging
import os

import jax

from ldm_jax.parallel.distributed import maybe_initialize


def setup_runtime(
    *,
    compilation_cache_dir: str | None = "~/.cache/ldm_jax/xla",
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    cpu_devices: int = 0,
) -> None:
  """Joins a multi-process job if there is one, then turns on the compile cache.

  The persistent cache makes a restarted (or preempted) job skip most of its
  compilation; ``compilation_cache_dir=None`` or ``""`` disables it, and a
  multi-process job on CPU (a test setup) runs without it.
  ``cpu_devices > 0`` splits the host CPU into that many JAX devices (see
  :func:`split_cpu`); it must run before JAX has created its backends.
  """
  split_cpu(cpu_devices)
  multi_process = maybe_initialize(coordinator_address, num_processes, process_id)
  if multi_process and jax.default_backend() == "cpu":
    # On CPU the cache key holds the device assignment, which JAX strips only
    # on GPU, so each process has its own key and only process 0 writes: a
    # warm cache serves process 0 alone while the others compile anyway (no
    # time saved), and from jax 0.12 a job mixing a loaded executable with
    # freshly compiled ones hangs in its first cross-process collective.
    logging.getLogger(__name__).info("multi-process CPU job: persistent compilation cache off")
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache_dir = None
  if compilation_cache_dir:
    path = os.path.expanduser(compilation_cache_dir)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  # orbax and grain log every file operation through absl at INFO.
  logging.getLogger("absl").setLevel(logging.WARNING)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")


def split_cpu(num_devices: int) -> None:
  """Makes JAX's CPU backend ``num_devices`` devices (``num_devices <= 0``: leave it).

  XLA:CPU runs one program's small convolutions on about one core. Split
  into devices, the data-parallel step runs one shard per core (the demo's
  speed-up is in docs/benchmarks.md). A device count already
  forced through ``XLA_FLAGS`` (``--xla_force_host_platform_device_count``)
  is the user's choice and wins. Accelerators are not affected.
  """
  if num_devices <= 0 or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return
  try:
    jax.config.update("jax_num_cpu_devices", int(num_devices))
  except RuntimeError as e:  # backends already exist
    raise RuntimeError(
        f"mesh.cpu_devices={num_devices} must be applied before JAX creates its devices; "
        "call setup_runtime() before any JAX computation"
    ) from e
