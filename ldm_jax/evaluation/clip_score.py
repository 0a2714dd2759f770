"""CLIP score: ``100 * max(cos(image_embed, text_embed), 0)``, averaged (torchmetrics' definition).

Embeddings are CLIP's *projected* ones: ``image_embeds`` of
:class:`~ldm_jax.evaluation.clip_image.CLIPVisionModelWithProjection` and the
text tower's ``text_embeds`` (pooled EOS token through ``text_projection``).
The text side is given either as embeddings or through any callable that
maps the caller's text representation (token ids, strings) to them, so this
module needs no text encoder of its own.
"""

from collections.abc import Callable
from typing import Any

import numpy as np


def clip_score_per_sample(image_embeds_BxD, text_embeds_BxD) -> np.ndarray:
  """``100 * max(cos, 0)`` of each image/text pair, in float64, shape (B,)."""
  img = np.asarray(image_embeds_BxD, np.float64)
  txt = np.asarray(text_embeds_BxD, np.float64)
  if img.ndim != 2 or img.shape != txt.shape:
    raise ValueError(f"image and text embeddings must both be (B, D) of one shape, got {img.shape} and {txt.shape}")
  norms = np.linalg.norm(img, axis=1) * np.linalg.norm(txt, axis=1)
  if np.any(norms == 0):
    raise ValueError("an embedding has zero norm: its cosine similarity is undefined")
  cos = np.sum(img * txt, axis=1) / norms
  return 100.0 * np.maximum(cos, 0.0)


def clip_score(image_embeds_BxD, text_embeds_BxD) -> float:
  """Mean CLIP score over the pairs."""
  return float(clip_score_per_sample(image_embeds_BxD, text_embeds_BxD).mean())


def clip_score_for_images(
    images_BxHxWx3,
    texts: Any,
    *,
    embed_images: Callable[[Any], Any],
    embed_texts: Callable[[Any], Any] | None = None,
) -> float:
  """CLIP score of images against their captions.

  ``embed_images`` maps the image batch to projected embeddings (e.g. a
  ShardedFeatureExtractor over ``clip_image_embed_fn``). ``texts`` are text
  embeddings when ``embed_texts`` is None, else whatever ``embed_texts``
  takes (token ids for the CLIP text tower).
  """
  text_embeds = texts if embed_texts is None else embed_texts(texts)
  return clip_score(embed_images(images_BxHxWx3), text_embeds)
