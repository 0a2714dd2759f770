"""A whole CLIP model for CLIP score: image tower, text tower with projection, tokenizer.

Read from a transformers CLIP folder (``save_pretrained`` of
``openai/clip-vit-large-patch14`` or ``openai/clip-vit-base-patch32``):
``config.json``, ``model.safetensors`` (or ``pytorch_model.bin``) and the
tokenizer files. Both towers are ours (``clip_image``, ``models.clip_text``).
"""

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.evaluation import clip_image
from ldm_jax.interop import naming, weights
from ldm_jax.models.clip_text import CLIPTextModel

_TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "hidden_act", "layer_norm_eps")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclasses.dataclass
class CLIPScorer:
  """``embed_fn`` (for a ShardedFeatureExtractor) and ``embed_texts(strings)``."""

  vision: clip_image.CLIPVisionModelWithProjection
  vision_variables: Any
  text: CLIPTextModel
  text_variables: Any
  tokenizer: Any
  path: str
  weights_file: str

  @property
  def embed_fn(self):
    """``fn(variables, images) -> {"image_embeds"}``: the image side, preprocessing included."""
    embed = clip_image.clip_image_embed_fn(self.vision)
    return lambda variables, images: {"image_embeds": embed(variables, images)}

  def extractor(self, mesh=None):
    from ldm_jax.evaluation.features import ShardedFeatureExtractor

    return ShardedFeatureExtractor(self.embed_fn, self.vision_variables, mesh)

  def embed_texts(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
    from ldm_jax.data.tokenizers import tokenize

    encode = jax.jit(lambda v, ids, mask: self.text.apply(v, ids, mask, method=self.text.encode).text_embeds)
    out = []
    for start in range(0, len(texts), batch_size):
      ids, mask = tokenize(self.tokenizer, texts[start: start + batch_size], self.text.max_position_embeddings)
      out.append(np.asarray(encode(self.text_variables, ids, mask)))
    return np.concatenate(out)


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
  vision = clip_image.CLIPVisionModelWithProjection(**clip_image.clip_vision_config_from_hf(config))
  text_cfg = config["text_config"]
  text = CLIPTextModel(**{k: text_cfg[k] for k in _TEXT_FIELDS if k in text_cfg},
                       projection_dim=config.get("projection_dim", 512))
  state = weights.read_state_dict(files[0])
  vision_variables = clip_image.convert_clip_vision_state_dict(state, vision)
  ids = jax.ShapeDtypeStruct((1, text.max_position_embeddings), jnp.int32)
  template = jax.eval_shape(lambda k, i: text.init(k, i, method=text.encode), jax.random.key(0), ids)
  text_state = {k: v for k, v in state.items() if k.startswith(("text_model.", "text_projection."))}
  text_variables = naming.torch_to_flax(text_state, template, what=f"CLIP text weights in {files[0]}")
  from transformers import CLIPTokenizer

  tokenizer = CLIPTokenizer.from_pretrained(path)
  return CLIPScorer(vision, vision_variables, text, text_variables, tokenizer, os.path.abspath(path), files[0])
