"""A stage-2 run's own copy of its frozen first stage.

Written once when stage 2 starts (``first_stage/weights.safetensors`` and
``first_stage/config.json`` with the model config and scale factor), so a
run directory samples on its own even if the stage-1 run is moved or gone.
"""

import json
import os
from typing import Any

import jax

from ldm_jax.interop.weights import load_variables, save_variables
from ldm_jax.models.first_stage import make_first_stage

WEIGHTS, CONFIG = "weights.safetensors", "config.json"


def save_first_stage_copy(directory: str, variables: Any, model_config: dict, scale_factor: float) -> None:
  os.makedirs(directory, exist_ok=True)
  save_variables(os.path.join(directory, WEIGHTS), jax.device_get(variables))
  with open(os.path.join(directory, CONFIG), "w") as f:
    json.dump({"model": model_config, "scale_factor": float(scale_factor)}, f, indent=2)


def is_first_stage_copy(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, CONFIG)) and os.path.isfile(os.path.join(directory, WEIGHTS))


def load_first_stage_copy(directory: str):
  """``(model, variables, scale_factor, model_config)`` of a saved copy."""
  with open(os.path.join(directory, CONFIG)) as f:
    saved = json.load(f)
  model = make_first_stage(saved["model"])
  variables = load_variables(os.path.join(directory, WEIGHTS), what="first-stage weights")
  return model, variables, saved["scale_factor"], saved["model"]
