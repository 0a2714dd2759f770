"""The command-line flags of a job that may span several processes, and the runtime they set up.

``train.py`` and ``precompute_latents.py`` import this module, so both take
``--coordinator_address``, ``--num_processes`` and ``--process_id`` and set the
process up the same way (see :func:`ldm_jax.parallel.runtime.setup_runtime`).
"""

from absl import flags
from ml_collections import ConfigDict

from ldm_jax.parallel.runtime import setup_runtime

_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")


def setup_process(config: ConfigDict) -> None:
  """Joins the job named by the flags (if any), splits the CPU and opens the compile cache as ``config`` says."""
  setup_runtime(
      compilation_cache_dir=config.get("compilation_cache_dir", "~/.cache/ldm_jax/xla"),
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
      cpu_devices=config.mesh.get("cpu_devices", 0),
  )
