"""CLIP's image tower (ViT) with its projection, for CLIP score; NHWC.

Names and fields follow transformers' ``CLIPVisionModelWithProjection``:
``vision_model/embeddings/{patch_embedding,class_embedding,position_embedding}``,
``vision_model/pre_layrnorm`` (sic), ``vision_model/encoder/layers_i/...``,
``vision_model/post_layernorm``, ``visual_projection``. A transformers (or
OpenAI-in-HF-format) checkpoint converts with one generic rename
(``ldm_jax.interop.clip_image``).

Pre-LN transformer without a causal mask (``models.clip_transformer``, shared
with the text tower); the pooled output is ``post_layernorm`` of the class
token, projected without bias.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.clip_transformer import clip_encoder
from ldm_jax.nn.norm import LayerNorm

# OpenAI CLIP's normalisation of [0, 1] RGB (CLIPImageProcessor's image_mean/std).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

CLIP_VISION_CONFIGS: dict[str, dict[str, Any]] = {
    # openai/clip-vit-large-patch14 (the text encoder's partner in SD v1).
    "vit_l14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=224, patch_size=14, projection_dim=768),
    # openai/clip-vit-base-patch32.
    "vit_b32": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    image_size=224, patch_size=32, projection_dim=512),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 image_size=32, patch_size=8, projection_dim=16),
}


class CLIPVisionEmbeddings(nn.Module):
  hidden_size: int
  image_size: int
  patch_size: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels_BxHxWx3):
    b, h, w, _ = pixels_BxHxWx3.shape
    if (h, w) != (self.image_size, self.image_size):
      raise ValueError(f"CLIP vision model expects {self.image_size}x{self.image_size} images, got {h}x{w}; "
                       "use preprocess_for_clip")
    p = self.patch_size
    patches = nn.Conv(self.hidden_size, (p, p), strides=p, padding="VALID", use_bias=False, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="patch_embedding")(pixels_BxHxWx3.astype(self.dtype))
    patches_BxPxD = patches.reshape(b, -1, self.hidden_size)
    cls = self.param("class_embedding", nn.initializers.normal(self.hidden_size**-0.5), (self.hidden_size,),
                     self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.hidden_size)), patches_BxPxD], 1)
    positions = nn.Embed(x.shape[1], self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="position_embedding")(jnp.arange(x.shape[1]))
    return x + positions[None]


class CLIPVisionHyperparameters(nn.Module):
  """transformers' ``CLIPVisionConfig`` fields (defaults: ViT-L/14), plus ours."""

  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_attention_heads: int = 16
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  attention_impl: str = "auto"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  num_hidden_layers: int = 24
  image_size: int = 224
  patch_size: int = 14

  def hyperparameters(self) -> dict[str, Any]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(CLIPVisionHyperparameters)
            if f.name not in ("parent", "name")}


class CLIPVisionTransformer(CLIPVisionHyperparameters):
  """Patch + class + position embeddings, pre-LN, encoder; pools the class token."""

  @nn.compact
  def __call__(self, pixels_BxHxWx3):
    ln = lambda name: LayerNorm(epsilon=self.layer_norm_eps, param_dtype=self.param_dtype, name=name)  # noqa: E731
    x = CLIPVisionEmbeddings(self.hidden_size, self.image_size, self.patch_size, dtype=self.dtype,
                             param_dtype=self.param_dtype, name="embeddings")(pixels_BxHxWx3)
    x = ln("pre_layrnorm")(x)
    x, _ = clip_encoder(self, causal=False)(x)
    return x, ln("post_layernorm")(x[:, 0])


class CLIPVisionModelWithProjection(CLIPVisionHyperparameters):
  """Images normalised by :func:`preprocess_for_clip` -> ``image_embeds`` and more.

  Defaults are ViT-L/14; ``CLIP_VISION_CONFIGS`` holds the others.
  """

  projection_dim: int = 768

  @nn.compact
  def __call__(self, pixels_BxHxWx3: jax.Array) -> dict[str, jax.Array]:
    x, pooled = CLIPVisionTransformer(**self.hyperparameters(), name="vision_model")(pixels_BxHxWx3)
    embeds = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="visual_projection")(pooled)
    return {"image_embeds": embeds, "pooler_output": pooled, "last_hidden_state": x}


def clip_vision_model(name: str = "vit_l14", **overrides: Any) -> CLIPVisionModelWithProjection:
  """A configured model: ``"vit_l14"``, ``"vit_b32"`` or ``"tiny"``."""
  if name not in CLIP_VISION_CONFIGS:
    raise ValueError(f"unknown CLIP vision config {name!r}; choose from {sorted(CLIP_VISION_CONFIGS)}")
  return CLIPVisionModelWithProjection(**{**CLIP_VISION_CONFIGS[name], **overrides})


@functools.partial(jax.jit, static_argnames=("image_size", "value_range"))
def preprocess_for_clip(
    images_BxHxWx3: jax.Array, image_size: int = 224, value_range: tuple[float, float] = (-1.0, 1.0)
) -> jax.Array:
  """CLIP's image preprocessing, in JAX.

  Resizes the shorter side to ``image_size`` (bicubic, a = -0.5, antialiased
  when shrinking: PIL's filter, applied like PIL to 8-bit images: width pass,
  clip to [0, 1], height pass, clip), centre-crops a square and normalises
  with CLIP's mean and std. Takes floats in ``value_range`` or ``uint8``;
  unlike the 8-bit pipeline, values are not rounded to multiples of 1/255.
  """
  x = jnp.asarray(images_BxHxWx3)
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f"CLIP expects NHWC RGB images (B, H, W, 3), got shape {x.shape}")
  if x.dtype == jnp.uint8:
    x = x.astype(jnp.float32) / 255.0
  else:
    lo, hi = value_range
    x = (x.astype(jnp.float32) - lo) / (hi - lo)
  b, h, w, c = x.shape
  # transformers' rule: the longer side becomes int(size * long / short).
  if h <= w:
    new_h, new_w = image_size, int(image_size * w / h)
  else:
    new_h, new_w = int(image_size * h / w), image_size
  # Two passes, width first, each clipped to [0, 1]: PIL resizes 8-bit images
  # this way, and bicubic overshoot clipped between the passes changes pixels.
  if new_w != w:
    x = jnp.clip(jax.image.resize(x, (b, h, new_w, c), "bicubic", antialias=True), 0.0, 1.0)
  if new_h != h:
    x = jnp.clip(jax.image.resize(x, (b, new_h, new_w, c), "bicubic", antialias=True), 0.0, 1.0)
  top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
  # Clip again for inputs that needed no resize: 8-bit images hold nothing outside [0, 1].
  x = jnp.clip(x[:, top: top + image_size, left: left + image_size], 0.0, 1.0)
  return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def clip_image_embed_fn(
    model: CLIPVisionModelWithProjection, value_range: tuple[float, float] = (-1.0, 1.0)
) -> Callable[[Any, jax.Array], jax.Array]:
  """``fn(variables, images) -> image_embeds`` including preprocessing (for ShardedFeatureExtractor)."""

  def embed(variables, images):
    return model.apply(variables, preprocess_for_clip(images, model.image_size, value_range))["image_embeds"]

  return embed
