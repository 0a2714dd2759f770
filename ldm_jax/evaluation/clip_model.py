"""A whole CLIP model for CLIP score: image tower, text tower with projection, tokenizer.

Both towers are ours (``clip_image``, ``models.clip_text``); a transformers
CLIP folder is read into a :class:`CLIPScorer` by ``ldm_jax.interop.clip_model``.
"""

import dataclasses
from typing import Any

import jax
import numpy as np

from ldm_jax.data.tokenizers import tokenize
from ldm_jax.evaluation import clip_image
from ldm_jax.evaluation.features import ShardedFeatureExtractor
from ldm_jax.models.clip_text import CLIPTextModel


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
    return ShardedFeatureExtractor(self.embed_fn, self.vision_variables, mesh)

  def embed_texts(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
    encode = jax.jit(lambda v, ids, mask: self.text.apply(v, ids, mask, method=self.text.encode).text_embeds)
    out = []
    for start in range(0, len(texts), batch_size):
      ids, mask = tokenize(self.tokenizer, texts[start: start + batch_size], self.text.max_position_embeddings)
      out.append(np.asarray(encode(self.text_variables, ids, mask)))
    return np.concatenate(out)
