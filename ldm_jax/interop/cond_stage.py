"""A stage-2 conditioning encoder's variables, read from its ``checkpoint`` when the config names one.

The checkpoint (a ``.safetensors`` file or folder, or a PyTorch
``.ckpt``/``.bin`` when torch is installed) may be an original LDM/SD
checkpoint (``cond_stage_model.*``), a diffusers/transformers
``text_encoder`` or an OpenCLIP (SD 2.x) file.
"""

from collections.abc import Mapping
from typing import Any

import jax

from ldm_jax.interop import naming
from ldm_jax.interop.ldm_config import COND_PREFIX
from ldm_jax.interop.openclip import add_text_model_prefix, openclip_text_to_transformers
from ldm_jax.interop.weights import read_state_dict
from ldm_jax.models.cond_stage import CondStage


def cond_stage_variables(stage: CondStage, rng: jax.Array, cond_input: Any) -> dict[str, Any] | None:
  """None without a module; loaded from ``stage.checkpoint`` when set; else freshly initialised."""
  if stage.module is None:
    return None
  if stage.checkpoint is None:
    return stage.init(rng, cond_input)
  template = jax.eval_shape(stage.module.init, rng, cond_input)
  return load_cond_stage_variables(stage, stage.checkpoint, template)


def load_cond_stage_variables(
    stage: CondStage, checkpoint: str | Mapping[str, Any], template: Mapping[str, Any]
) -> dict[str, Any]:
  """Loads ``stage``'s weights from a checkpoint path or an in-memory state dict.

  Accepts an original LDM/SD checkpoint (``cond_stage_model.*``), a bare
  module state dict (e.g. diffusers' ``text_encoder``, or transformers 5's
  ``CLIPTextModel`` without ``text_model.``), and for ``clip`` an OpenCLIP
  text tower (SD 2.x: ``cond_stage_model.model.*``).
  """
  what = checkpoint if isinstance(checkpoint, str) else "state dict"
  state_dict = read_state_dict(checkpoint, prefer_prefix=COND_PREFIX)
  prefix = stage.checkpoint_prefix if any(k.startswith(stage.checkpoint_prefix) for k in state_dict) else ""
  if stage.kind == "clip":
    for openclip_prefix in (COND_PREFIX + "model.", ""):
      if any(k.startswith(openclip_prefix + "transformer.resblocks.") for k in state_dict):
        has_projection = stage.module.projection_dim is not None
        state_dict = openclip_text_to_transformers(
            state_dict, prefix=openclip_prefix, include_projection=has_projection
        )
        prefix = ""
        break
    if not prefix:  # transformers 5 saves CLIPTextModel without its `text_model.` level
      state_dict = add_text_model_prefix(state_dict)
  return naming.torch_to_flax(state_dict, template, strip_prefix=prefix, ignore=stage.ignore_keys, what=what)
