"""Joining JAX's multi-controller runtime on TPU pods and GPU clusters."""

import itertools
import logging
import os
from typing import Any

import jax


def _env_int(*names: str) -> int | None:
  for n in names:
    if os.environ.get(n, "").strip().isdigit():
      return int(os.environ[n])
  return None


def _on_cloud_tpu_vm() -> bool:
  """Whether this is a Cloud TPU VM (JAX's own check, no device access)."""
  if os.environ.get("LDM_JAX_NO_TPU_AUTO_INIT"):
    return False
  try:
    from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm  # private: guarded
  except ImportError:
    return False
  return bool(running_in_cloud_tpu_vm)


def maybe_initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: list[int] | None = None,
) -> bool:
  """Calls ``jax.distributed.initialize`` when this is a multi-process job.

  - explicit arguments (``--coordinator_address/--num_processes/--process_id``)
    win;
  - SLURM (``SLURM_NTASKS`` > 1) and Cloud TPU VMs (GKE's
    ``TPU_WORKER_HOSTNAMES`` or any TPU VM, where JAX reads the metadata
    server) are detected and JAX discovers the rest itself;
  - otherwise this is a single-process run and nothing is done.

  Returns whether the distributed runtime was initialised. Must run before
  anything touches the devices.
  """
  if coordinator_address or (num_processes or 1) > 1:
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )
  elif (_env_int("SLURM_NTASKS") or 1) > 1:
    jax.distributed.initialize()  # JAX's SlurmCluster reads the SLURM_* variables.
  elif len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1 or _on_cloud_tpu_vm():
    # JAX's TPU cluster detection (GKE variables or the GCE metadata server)
    # finds the coordinator, process count and id; a one-host VM joins alone.
    jax.distributed.initialize()
  else:
    return False
  logging.info("process %d of %d, %d local devices", jax.process_index(), jax.process_count(), jax.local_device_count())
  return True


_barrier_serial = itertools.count()


def barrier(name: str, timeout_s: float = 3600.0) -> None:
  """Blocks until every process of the job has reached this point (no-op in
  a single-process run).

  It waits on JAX's coordination service, not on a device collective, so it
  needs no communicator and has its own generous timeout. Every process must
  pass the same barriers in the same order (the names carry a serial number).
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # private: the call JAX's own array serialization makes

  barrier_id = f"ldm_jax/{name}/{next(_barrier_serial)}"
  jax_distributed.global_state.client.wait_at_barrier(barrier_id, timeout_in_ms=int(timeout_s * 1000))


def compile_in_lockstep(jitted: Any, *args: Any, name: str, **kwargs: Any) -> None:
  """In a multi-process job, compiles ``jitted`` for these arguments, then
  waits for every process (a single process has no one to wait for: nothing
  is done, and the first call compiles as usual).

  Why: the first run of a program with cross-process collectives sets up its
  communicator, and on CPU (gloo) that gives up after a fixed 30 s if a peer
  has not arrived, while the same program's compiles can finish minutes
  apart on a loaded host. The compiled executable lands in ``jitted``'s own
  cache, so the next ``jitted(*args, **kwargs)`` starts at once, on every
  process within moments of the others.
  """
  if jax.process_count() == 1:
    return
  jitted.lower(*args, **kwargs).compile()
  barrier(f"compiled/{name}")
