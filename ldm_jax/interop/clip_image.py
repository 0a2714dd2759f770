"""CLIP's image tower from a transformers checkpoint (a model folder or a weights file).

The network is ``ldm_jax.evaluation.clip_image``; its names are
transformers' ``CLIPVisionModelWithProjection``'s, so the weights convert
with the generic rename in ``naming``.
"""

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from ldm_jax.evaluation.clip_image import CLIPVisionModelWithProjection
from ldm_jax.interop import naming, weights


def clip_vision_config_from_hf(config: Mapping[str, Any] | str) -> dict[str, Any]:
  """Our model fields from a transformers ``config.json`` (CLIPConfig or CLIPVisionConfig), or its path."""
  if isinstance(config, str):
    with open(config) as f:
      config = json.load(f)
  vision = config.get("vision_config", config)
  keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
          "patch_size", "layer_norm_eps", "hidden_act")
  missing = [k for k in keys[:6] if k not in vision]
  if missing:
    raise KeyError(f"CLIP vision config lacks {missing}")
  fields = {k: vision[k] for k in keys if k in vision}
  fields["projection_dim"] = config.get("projection_dim", vision.get("projection_dim", 512))
  return fields


def convert_clip_vision_state_dict(
    state_dict: Mapping[str, Any], model: CLIPVisionModelWithProjection
) -> dict[str, Any]:
  """transformers CLIP state dict (vision model, or the whole CLIPModel) -> our variables."""
  vision = {k: v for k, v in state_dict.items() if k.startswith(("vision_model.", "visual_projection."))}
  if not vision:
    raise ValueError("the state dict has no 'vision_model.*' keys: not a transformers CLIP checkpoint")
  pixels = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
  template = jax.eval_shape(model.init, jax.random.key(0), pixels)
  return naming.torch_to_flax(vision, template, what="CLIP vision state dict")


def load_clip_vision_checkpoint(
    path: str, model: CLIPVisionModelWithProjection | None = None
) -> tuple[CLIPVisionModelWithProjection, dict[str, Any]]:
  """Reads a transformers CLIP checkpoint (a model directory or a weights file).

  From a directory, the model's configuration is read from its
  ``config.json``. Returns ``(model, variables)``.
  """
  if os.path.isdir(path):
    if model is None:
      model = CLIPVisionModelWithProjection(**clip_vision_config_from_hf(os.path.join(path, "config.json")))
    names = ("model.safetensors", "pytorch_model.bin")
    found = [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
    if not found:
      raise FileNotFoundError(f"{path} holds none of {names}")
    path = found[0]
  if model is None:
    raise ValueError(f"{path} is a bare weights file: pass the model (e.g. clip_vision_model('vit_l14'))")
  return model, convert_clip_vision_state_dict(weights.read_state_dict(path), model)
