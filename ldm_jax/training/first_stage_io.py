"""What a stage-1 run directory holds, on the writing side.

A stage-1 run directory (``train.py --config configs/autoencoder.py``)
holds ``checkpoints/<step>/{state,meta}``; ``meta`` carries the model
config and the latent scale factor computed from the saved weights.
``ldm_jax.interop.run_dirs`` reads it back.
"""

import os
from collections.abc import Mapping
from typing import Any

from ldm_jax.training.checkpoint import Checkpointer, nest

# Where the autoencoder's params sit in the stage-1 state (Stage1State.params["ae"]).
AE_PARAMS_PATH = ("params", "ae")
STAGE = "autoencoder"


def first_stage_meta(model_config: Mapping[str, Any], scale_factor: float, **extra: Any) -> dict:
  """The checkpoint metadata ``load_first_stage`` reads (plus ``extra``)."""
  return {"stage": STAGE, "model": dict(model_config), "scale_factor": float(scale_factor), **extra}


def save_first_stage(
    run_dir: str | os.PathLike, params: Any, model_config: Mapping[str, Any], scale_factor: float, *, step: int = 0
) -> str:
  """Writes autoencoder ``params`` as a run directory :func:`load_first_stage`
  (``ldm_jax.interop``) reads (e.g. weights converted from elsewhere); returns its checkpoint folder.

  Only the weights are stored: training cannot resume from it.
  """
  ckpt_dir = os.path.join(os.path.abspath(os.fspath(run_dir)), "checkpoints")
  checkpointer = Checkpointer(ckpt_dir, async_save=False)
  try:
    checkpointer.save(step, nest(AE_PARAMS_PATH, params), meta=first_stage_meta(model_config, scale_factor))
  finally:
    checkpointer.close()
  return ckpt_dir
