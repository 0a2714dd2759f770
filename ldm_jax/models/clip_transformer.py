"""CLIP's transformer encoder, shared by the text tower (causal) and the image tower (bidirectional).

Pre-LayerNorm layers: x + attn(ln1(x)), then x + mlp(ln2(x)). Names follow
transformers' ``CLIPEncoder``: ``layers_{i}/{layer_norm1, self_attn/{q,k,v,out}_proj,
layer_norm2, mlp/{fc1, fc2}}``.
"""

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.nn.attention import dot_product_attention
from ldm_jax.nn.norm import LayerNorm

# The fields a tower passes on to its encoder (both towers name them alike).
ENCODER_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "hidden_act",
                  "layer_norm_eps", "attention_impl", "dtype", "param_dtype")


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's sigmoid approximation of GELU."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": partial(jax.nn.gelu, approximate=False)}


class CLIPAttention(nn.Module):
  """Multi-head self-attention (causal for text) with biased q/k/v/out projections."""

  hidden_size: int
  num_attention_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = "auto"
  causal: bool = False

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, key_mask_BxL: jax.Array | None = None) -> jax.Array:
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                       f"{self.num_attention_heads}")
    dense = partial(nn.Dense, self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype)
    b, length, _ = x_BxLxD.shape

    def heads(name):
      return dense(name=name)(x_BxLxD).reshape(b, length, self.num_attention_heads, -1)

    mask = None if key_mask_BxL is None else key_mask_BxL[:, None, None, :]
    out = dot_product_attention(  # scale head_dim**-0.5, as CLIP
        heads("q_proj"), heads("k_proj"), heads("v_proj"), mask,
        is_causal=self.causal, implementation=self.attention_impl,
    )
    return dense(name="out_proj")(out.reshape(b, length, self.hidden_size))


class CLIPMLP(nn.Module):
  hidden_size: int
  intermediate_size: int
  hidden_act: str
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    x = ACTIVATIONS[self.hidden_act](dense(self.intermediate_size, name="fc1")(x))
    return dense(self.hidden_size, name="fc2")(x)


class CLIPEncoderLayer(nn.Module):
  hidden_size: int
  intermediate_size: int
  num_attention_heads: int
  hidden_act: str
  layer_norm_eps: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = "auto"
  causal: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, key_mask_BxL: jax.Array | None = None) -> jax.Array:
    norm = partial(LayerNorm, epsilon=self.layer_norm_eps, param_dtype=self.param_dtype)
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x + CLIPAttention(
        self.hidden_size, self.num_attention_heads, attention_impl=self.attention_impl, causal=self.causal,
        name="self_attn", **common,
    )(norm(name="layer_norm1")(x), key_mask_BxL)
    return x + CLIPMLP(
        self.hidden_size, self.intermediate_size, self.hidden_act, name="mlp", **common
    )(norm(name="layer_norm2")(x))


class CLIPEncoder(nn.Module):
  """The layer stack; returns (output of the last layer, input to the last layer)."""

  hidden_size: int
  intermediate_size: int
  num_attention_heads: int
  num_hidden_layers: int
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  attention_impl: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  causal: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, key_mask_BxL: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act must be one of {sorted(ACTIVATIONS)}, got {self.hidden_act!r}")
    before_last = x
    for i in range(self.num_hidden_layers):
      before_last = x
      x = CLIPEncoderLayer(
          self.hidden_size, self.intermediate_size, self.num_attention_heads, self.hidden_act,
          self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
          attention_impl=self.attention_impl, causal=self.causal, name=f"layers_{i}",
      )(x, key_mask_BxL)
    return x, before_last


def clip_encoder(tower: nn.Module, *, causal: bool, name: str = "encoder") -> CLIPEncoder:
  """The encoder of ``tower`` (a text or image tower with the ``ENCODER_FIELDS``)."""
  return CLIPEncoder(**{f: getattr(tower, f) for f in ENCODER_FIELDS}, causal=causal, name=name)
