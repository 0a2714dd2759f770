"""CLIP text transformer: SD v1's frozen text encoder and SD v2's OpenCLIP ViT-H text tower.

Parameters are named like transformers' ``CLIPTextModel`` (and
``CLIPTextModelWithProjection`` when ``projection_dim`` is set), so a
transformers / diffusers ``text_encoder`` or the ``cond_stage_model.transformer.*``
part of an original SD v1 checkpoint loads with the generic rename in
``ldm_jax.interop.naming``. SD v2 original checkpoints store OpenCLIP names:
convert them first with ``ldm_jax.interop.openclip``.

The stack (``clip_transformer``, shared with the image tower) is
pre-LayerNorm, causally masked, with a final LayerNorm.
``output_layer`` picks what the UNet sees: ``"last"`` (SD v1) or
``"penultimate"`` (SD v2's ``FrozenOpenCLIPEmbedder``: the output of layer N-1
through the final LayerNorm). diffusers' SD v2 ``text_encoder`` stores only
those 23 layers and uses ``"last"``; preset ``"sd_v2_diffusers"`` loads it and
gives the same numbers as ``"sd_v2"`` on the original 24-layer weights.
"""

import dataclasses
from functools import partial
from typing import Any, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.clip_transformer import ACTIVATIONS, clip_encoder
from ldm_jax.nn.norm import LayerNorm

OutputLayer = Literal["last", "penultimate"]
OUTPUT_LAYERS = ("last", "penultimate")


class CLIPTextOutput(NamedTuple):
  context: jax.Array  # (B, L, D): what the UNet cross-attends to, per ``output_layer``.
  last_hidden_state: jax.Array  # (B, L, D): all layers, then the final LayerNorm.
  pooled_output: jax.Array  # (B, D): last_hidden_state at the EOS token (argmax of ids).
  text_embeds: jax.Array | None  # (B, P): pooled_output @ text_projection, if the model has one.


class CLIPTextEmbeddings(nn.Module):
  vocab_size: int
  hidden_size: int
  max_position_embeddings: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids_BxL: jax.Array) -> jax.Array:
    embed = partial(nn.Embed, features=self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype)
    tokens = embed(self.vocab_size, name="token_embedding")(input_ids_BxL)
    positions = embed(self.max_position_embeddings, name="position_embedding")(
        jnp.arange(input_ids_BxL.shape[1])
    )
    return tokens + positions[None]


class CLIPTextHyperparameters(nn.Module):
  """transformers' ``CLIPTextConfig`` fields (defaults: OpenAI CLIP ViT-L/14, SD v1), plus ours."""

  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  output_layer: OutputLayer = "last"
  projection_dim: int | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = "auto"

  def hyperparameters(self) -> dict[str, Any]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(CLIPTextHyperparameters)
            if f.name not in ("parent", "name")}


class CLIPTextTransformer(CLIPTextHyperparameters):
  """transformers' ``text_model``: returns (last, penultimate) states, both final-normed."""

  @nn.compact
  def __call__(self, input_ids_BxL, key_mask_BxL) -> tuple[jax.Array, jax.Array]:
    x = CLIPTextEmbeddings(
        self.vocab_size, self.hidden_size, self.max_position_embeddings,
        dtype=self.dtype, param_dtype=self.param_dtype, name="embeddings",
    )(input_ids_BxL)
    last, penultimate = clip_encoder(self, causal=True)(x, key_mask_BxL)
    final_norm = LayerNorm(epsilon=self.layer_norm_eps, param_dtype=self.param_dtype, name="final_layer_norm")
    return final_norm(last), final_norm(penultimate)


class CLIPTextModel(CLIPTextHyperparameters):
  """CLIP text encoder. ``__call__`` gives the UNet context; ``encode`` gives everything.

  ``projection_dim`` adds ``text_projection`` (no bias), as
  ``CLIPTextModelWithProjection``. Under ``jax.jit`` outputs that are not used
  (pooled output, the last layer in ``"penultimate"`` mode) are removed by XLA.
  """

  def __post_init__(self):
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act must be one of {sorted(ACTIVATIONS)}, got {self.hidden_act!r}")
    if self.output_layer not in OUTPUT_LAYERS:
      raise ValueError(f"output_layer must be one of {OUTPUT_LAYERS}, got {self.output_layer!r}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
      )
    if self.output_layer == "penultimate" and self.num_hidden_layers < 2:
      raise ValueError("output_layer='penultimate' needs num_hidden_layers >= 2")
    super().__post_init__()

  def __call__(self, input_ids_BxL: jax.Array, attention_mask_BxL: jax.Array | None = None) -> jax.Array:
    """Token ids (int, (B, L)) and optional key mask (1 = real token) -> context (B, L, D)."""
    return self.encode(input_ids_BxL, attention_mask_BxL).context

  @nn.compact
  def encode(self, input_ids_BxL: jax.Array, attention_mask_BxL: jax.Array | None = None) -> CLIPTextOutput:
    """All outputs: context, last hidden state, pooled output, projected embedding."""
    input_ids_BxL = check_token_ids(input_ids_BxL, self.max_position_embeddings, "CLIPTextModel")
    key_mask = check_attention_mask(attention_mask_BxL, input_ids_BxL.shape)
    last, penultimate = CLIPTextTransformer(**self.hyperparameters(), name="text_model")(input_ids_BxL, key_mask)
    # Like transformers (legacy eos id) and OpenCLIP: EOS is the largest id in CLIP's vocab.
    eos_index = jnp.argmax(input_ids_BxL, axis=-1)
    pooled = jnp.take_along_axis(last, eos_index[:, None, None], axis=1)[:, 0]
    text_embeds = None
    if self.projection_dim is not None:
      text_embeds = nn.Dense(
          self.projection_dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
          name="text_projection",
      )(pooled)
    context = penultimate if self.output_layer == "penultimate" else last
    return CLIPTextOutput(context, last, pooled, text_embeds)


def check_token_ids(input_ids_BxL, max_length: int, what: str) -> jax.Array:
  """Input check shared by the text encoders: integer ids (B, L) with L <= max_length."""
  input_ids_BxL = jnp.asarray(input_ids_BxL)
  if input_ids_BxL.ndim != 2 or not jnp.issubdtype(input_ids_BxL.dtype, jnp.integer):
    raise ValueError(
        f"{what} takes integer token ids of shape (batch, length), got {input_ids_BxL.dtype} "
        f"{input_ids_BxL.shape}"
    )
  if input_ids_BxL.shape[1] > max_length:
    raise ValueError(f"{what}: {input_ids_BxL.shape[1]} tokens exceed the maximum length {max_length}")
  return input_ids_BxL


def check_attention_mask(attention_mask_BxL, ids_shape) -> jax.Array | None:
  """Boolean key mask of the ids' shape (True = attend), or None."""
  if attention_mask_BxL is None:
    return None
  mask = jnp.asarray(attention_mask_BxL)
  if mask.shape != tuple(ids_shape):
    raise ValueError(f"attention mask shape {mask.shape} does not match the token ids' {tuple(ids_shape)}")
  return mask.astype(bool)


_SD_V2 = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    hidden_act="gelu", output_layer="penultimate",
)
CLIP_TEXT_PRESETS: dict[str, dict[str, Any]] = {
    # OpenAI CLIP ViT-L/14 text (SD v1.x): the CLIPTextModel defaults.
    "sd_v1": {},
    # OpenCLIP ViT-H/14 text as stored in original SD 2.x checkpoints (24 layers, penultimate).
    "sd_v2": _SD_V2,
    # The same encoder as diffusers stores it: the first 23 layers, last output.
    "sd_v2_diffusers": {**_SD_V2, "num_hidden_layers": 23, "output_layer": "last"},
    # For CPU tests and `tiny` configs; real CLIP vocabulary so real tokenizers work.
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
}


def clip_text_from_preset(preset: str, **overrides: Any) -> CLIPTextModel:
  """``CLIPTextModel`` for a named preset (see ``CLIP_TEXT_PRESETS``), fields overridable."""
  if preset not in CLIP_TEXT_PRESETS:
    raise ValueError(f"unknown CLIP text preset {preset!r}; valid presets: {sorted(CLIP_TEXT_PRESETS)}")
  return CLIPTextModel(**{**CLIP_TEXT_PRESETS[preset], **overrides})
