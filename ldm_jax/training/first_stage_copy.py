"""A stage-2 run's own copy of its frozen first stage.

Written once when stage 2 starts (``first_stage/weights.safetensors`` and
``first_stage/config.json`` with the model config and scale factor), so a
run directory samples on its own even if the stage-1 run is moved or gone.
"""

import json
import os
from typing import Any

import jax
import numpy as np

from ldm_jax.models.first_stage import make_first_stage
from ldm_jax.training.variables_file import load_variables, save_variables

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


def copy_differs(directory: str, variables: Any, model_config: dict, scale_factor: float) -> str | None:
  """What differs between the saved copy in ``directory`` and this first stage (None: nothing, or no copy).

  Stage 2 learns one first stage's latent space; resuming it on another's
  (say, an autoencoder trained further since) would silently mix the two.
  """
  if not is_first_stage_copy(directory):
    return None
  with open(os.path.join(directory, CONFIG)) as f:
    saved = json.load(f)
  if saved["model"] != json.loads(json.dumps(model_config)):
    return "model config"
  if not np.isclose(saved["scale_factor"], scale_factor, rtol=1e-6, atol=0.0):
    return f"scale factor ({saved['scale_factor']:.6g} saved, {scale_factor:.6g} now)"
  stored = load_variables(os.path.join(directory, WEIGHTS), what="first-stage weights")
  now = jax.device_get(variables)
  if jax.tree.structure(stored) != jax.tree.structure(now) or not all(
      np.array_equal(a, b) for a, b in zip(jax.tree.leaves(stored), jax.tree.leaves(now))):
    return "weights"
  return None
