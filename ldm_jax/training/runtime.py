"""Process-level setup shared by the entry points: logging, distributed
runtime, persistent compilation cache."""

import logging
import os

import jax


def setup_runtime(
    *,
    compilation_cache_dir: str | None = "~/.cache/ldm_jax/xla",
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
  """Joins a multi-process job if there is one, then turns on the compile cache.

  The persistent cache makes a restarted (or preempted) job skip most of its
  compilation; ``compilation_cache_dir=None`` or ``""`` disables it.
  """
  from ldm_jax.training.distributed import maybe_initialize

  maybe_initialize(coordinator_address, num_processes, process_id)
  if compilation_cache_dir:
    path = os.path.expanduser(compilation_cache_dir)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  # orbax and grain log every file operation through absl at INFO.
  logging.getLogger("absl").setLevel(logging.WARNING)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
