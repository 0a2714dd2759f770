"""A whole CLIP model for CLIP score, read from a transformers CLIP folder.

The folder is ``save_pretrained`` of ``openai/clip-vit-large-patch14`` or
``openai/clip-vit-base-patch32``: ``config.json``, ``model.safetensors`` (or
``pytorch_model.bin``) and the tokenizer files.
"""

import json
import os

import jax
import jax.numpy as jnp

from ldm_jax.evaluation.clip_image import CLIPVisionModelWithProjection
from ldm_jax.evaluation.clip_model import CLIPScorer
from ldm_jax.interop import naming, weights
from ldm_jax.interop.clip_image import clip_vision_config_from_hf, convert_clip_vision_state_dict
from ldm_jax.models.clip_text import CLIPTextModel

_TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "hidden_act", "layer_norm_eps")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def load_clip_scorer(path: str, *, flag: str = "--clip_weights") -> CLIPScorer:
  """Loads a transformers CLIP model folder; ``flag`` names the option in errors."""
  if not path or not os.path.isdir(path):
    raise FileNotFoundError(
        f"clip_score needs a CLIP model folder: {flag}={path or '<empty>'} is not a folder. Save one with "
        "transformers (CLIPModel.from_pretrained('openai/clip-vit-large-patch14').save_pretrained(DIR) and the "
        "same for CLIPTokenizer) on a machine with network access and pass the folder"
    )
  files = [os.path.join(path, n) for n in WEIGHT_FILES if os.path.isfile(os.path.join(path, n))]
  if not files or not os.path.isfile(os.path.join(path, "config.json")):
    raise FileNotFoundError(f"{flag}={path} must hold config.json and one of {WEIGHT_FILES}")
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  if "text_config" not in config or "vision_config" not in config:
    raise ValueError(f"{path}/config.json is not a whole CLIP model (it needs text_config and vision_config)")
  vision = CLIPVisionModelWithProjection(**clip_vision_config_from_hf(config))
  text_cfg = config["text_config"]
  text = CLIPTextModel(**{k: text_cfg[k] for k in _TEXT_FIELDS if k in text_cfg},
                       projection_dim=config.get("projection_dim", 512))
  state = weights.read_state_dict(files[0])
  vision_variables = convert_clip_vision_state_dict(state, vision)
  ids = jax.ShapeDtypeStruct((1, text.max_position_embeddings), jnp.int32)
  template = jax.eval_shape(lambda k, i: text.init(k, i, method=text.encode), jax.random.key(0), ids)
  text_state = {k: v for k, v in state.items() if k.startswith(("text_model.", "text_projection."))}
  text_variables = naming.torch_to_flax(text_state, template, what=f"CLIP text weights in {files[0]}")
  from transformers import CLIPTokenizer

  tokenizer = CLIPTokenizer.from_pretrained(path)
  return CLIPScorer(vision, vision_variables, text, text_variables, tokenizer, os.path.abspath(path), files[0])
