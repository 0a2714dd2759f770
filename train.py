"""Train a first stage (autoencoder) or a latent diffusion model.

  python train.py --config configs/autoencoder.py:kl_f4,shapes --workdir runs/ae
  python train.py --config configs/ldm.py:shapes_txt2img --config.train.num_steps=2000 --workdir runs/ldm

Rerunning the same command resumes from the newest checkpoint in --workdir.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from ldm_jax.config import check_override_flags, write_config

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/FILE.py[:VARIANTS]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, samples).", required=True)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")


def main(argv):
  del argv
  from ldm_jax.training.runtime import setup_runtime

  config = _CONFIG.value
  setup_runtime(
      compilation_cache_dir=config.get("compilation_cache_dir", "~/.cache/ldm_jax/xla"),
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
      cpu_devices=config.mesh.get("cpu_devices", 0),
  )
  import jax

  if jax.process_index() == 0:
    write_config(config, _WORKDIR.value)
  if config.stage == "autoencoder":
    from ldm_jax.training.train_autoencoder import train
  elif config.stage == "ldm":
    from ldm_jax.training.train_ldm import train
  else:
    raise SystemExit(f"error: config.stage must be 'autoencoder' or 'ldm', got {config.stage!r}")
  train(config, _WORKDIR.value)


if __name__ == "__main__":
  check_override_flags(sys.argv)
  app.run(main)
