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

from ldm_jax.apps.process_flags import setup_process
from ldm_jax.config import ConfigError, check_override_flags, write_config
from ldm_jax.training.preemption import PREEMPTED_EXIT_CODE, exit_on_sigterm

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/FILE.py[:VARIANTS]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, samples).", required=True)


def main(argv):
  del argv
  config = _CONFIG.value
  setup_process(config)
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
