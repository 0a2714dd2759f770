"""Train a first stage (autoencoder) or a latent diffusion model.

  python train.py --config configs/autoencoder.py:kl_f4,shapes --workdir runs/ae
  python train.py --config configs/ldm.py:shapes_txt2img --config.train.num_steps=2000 --workdir runs/ldm

Rerunning the same command resumes from the newest checkpoint in --workdir.
Exit status: 0 when training finished, 143 (PREEMPTED_EXIT_CODE) when SIGTERM
stopped it (a checkpoint is saved if training had started; rerun to resume),
1 on an error.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from ldm_jax.config import ConfigError, check_override_flags, write_config
from ldm_jax.training.preemption import PREEMPTED_EXIT_CODE, exit_on_sigterm

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/FILE.py[:VARIANTS]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, samples).", required=True)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")


def main(argv):
  del argv
  from ldm_jax.parallel.runtime import setup_runtime

  config = _CONFIG.value
  setup_runtime(
      compilation_cache_dir=config.get("compilation_cache_dir", "~/.cache/ldm_jax/xla"),
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
      cpu_devices=config.mesh.get("cpu_devices", 0),
  )
  import jax

  from ldm_jax.apps.train import STAGES, check, train

  if config.stage not in STAGES:
    raise SystemExit(f"error: config.stage must be one of {STAGES}, got {config.stage!r}")
  try:
    check(config)  # every setting, before anything loads or compiles
  except ConfigError as e:
    sys.exit(f"error: {e}")
  if jax.process_index() == 0:
    write_config(config, _WORKDIR.value)
  if train(config, _WORKDIR.value).preempted:
    sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
  exit_on_sigterm()  # a SIGTERM while loading and compiling exits cleanly too
  check_override_flags(sys.argv)
  app.run(main)
