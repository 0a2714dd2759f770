"""Cross-attention transformer of the LDM UNet (``ldm/modules/attention.py``).

``SpatialTransformer`` flattens a feature map into tokens and runs
``BasicTransformerBlock``s (self-attention, cross-attention to a context,
GEGLU feed-forward, each pre-LayerNorm and residual). Names mirror the
reference state dict (``proj_in``, ``transformer_blocks_0/attn2/to_k``,
``ff/net_0/proj``, ...).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.nn.attention import Implementation, dot_product_attention
from ldm_jax.nn.norm import GroupNorm, LayerNorm

# SpatialTransformer's input GroupNorm uses eps 1e-6 (the ResBlocks use 1e-5).
TRANSFORMER_NORM_EPS = 1e-6


class CrossAttention(nn.Module):
  """Multi-head attention from ``x`` to ``context`` (to ``x`` itself when None).

  q/k/v projections have no bias; the output projection ``to_out_0`` does.
  ``mask_BxS`` is boolean, True for context tokens that may be attended to.
  """

  heads: int = 8
  dim_head: int = 64
  attention_impl: Implementation = "auto"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def _dense(self, features: int, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

  @nn.compact
  def __call__(
      self, x_BxTxD: jax.Array, context_BxSxE: jax.Array | None = None, mask_BxS: jax.Array | None = None
  ) -> jax.Array:
    context = x_BxTxD if context_BxSxE is None else context_BxSxE
    inner = self.heads * self.dim_head

    def split_heads(t):
      return t.reshape(*t.shape[:2], self.heads, self.dim_head)

    q = split_heads(self._dense(inner, "to_q", use_bias=False)(x_BxTxD))
    k = split_heads(self._dense(inner, "to_k", use_bias=False)(context))
    v = split_heads(self._dense(inner, "to_v", use_bias=False)(context))
    mask = None if mask_BxS is None else jnp.asarray(mask_BxS, bool)[:, None, None, :]
    out = dot_product_attention(q, k, v, mask, implementation=self.attention_impl)
    return self._dense(x_BxTxD.shape[-1], "to_out_0")(out.reshape(*x_BxTxD.shape[:2], inner))


class GEGLU(nn.Module):
  """``proj`` to twice ``dim_out``, then ``value * gelu(gate)`` (exact, erf-based GELU)."""

  dim_out: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.Dense(2 * self.dim_out, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)
    value, gate = jnp.split(h, 2, axis=-1)
    return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """Gated feed-forward: GEGLU to ``mult * D`` (``net_0``), Dense back to D (``net_2``)."""

  mult: int = 4
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    dim = x_BxTxD.shape[-1]
    h = GEGLU(self.mult * dim, dtype=self.dtype, param_dtype=self.param_dtype, name="net_0")(x_BxTxD)
    return nn.Dense(dim, dtype=self.dtype, param_dtype=self.param_dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
  """Pre-LayerNorm self-attention, cross-attention and GEGLU feed-forward, each residual."""

  heads: int
  dim_head: int
  attention_impl: Implementation = "auto"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
      self, x_BxTxD: jax.Array, context_BxSxE: jax.Array | None = None, mask_BxS: jax.Array | None = None
  ) -> jax.Array:
    attn = dict(
        heads=self.heads, dim_head=self.dim_head, attention_impl=self.attention_impl, dtype=self.dtype,
        param_dtype=self.param_dtype,
    )
    norm = dict(param_dtype=self.param_dtype)
    x = x_BxTxD
    x = CrossAttention(**attn, name="attn1")(LayerNorm(**norm, name="norm1")(x)) + x
    x = CrossAttention(**attn, name="attn2")(LayerNorm(**norm, name="norm2")(x), context_BxSxE, mask_BxS) + x
    x = FeedForward(dtype=self.dtype, param_dtype=self.param_dtype, name="ff")(LayerNorm(**norm, name="norm3")(x)) + x
    return x


class SpatialTransformer(nn.Module):
  """Transformer over the positions of a feature map, with a residual around it.

  ``GroupNorm(eps 1e-6) -> proj_in -> depth x BasicTransformerBlock ->
  proj_out (zero-initialised) -> + input``. ``proj_in``/``proj_out`` are 1x1
  convs (LDM, SD v1) or, with ``use_linear`` (SD v2), dense layers applied
  after flattening.
  """

  heads: int
  dim_head: int
  depth: int = 1
  use_linear: bool = False
  norm_num_groups: int = 32
  attention_impl: Implementation = "auto"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
      self, x_BxHxWxC: jax.Array, context_BxSxE: jax.Array | None = None, mask_BxS: jax.Array | None = None
  ) -> jax.Array:
    b, height, width, c = x_BxHxWxC.shape
    inner = self.heads * self.dim_head
    x_in = x_BxHxWxC.astype(self.dtype)
    h = GroupNorm(
        num_groups=self.norm_num_groups, epsilon=TRANSFORMER_NORM_EPS, param_dtype=self.param_dtype, name="norm"
    )(x_in)
    h = self._project(inner, "proj_in")(h).reshape(b, height * width, inner)
    for i in range(self.depth):
      h = BasicTransformerBlock(
          self.heads, self.dim_head, attention_impl=self.attention_impl, dtype=self.dtype,
          param_dtype=self.param_dtype, name=f"transformer_blocks_{i}",
      )(h, context_BxSxE, mask_BxS)
    h = self._project(c, "proj_out", kernel_init=nn.initializers.zeros_init())(h.reshape(b, height, width, inner))
    return h + x_in

  def _project(self, features: int, name: str, **kwargs) -> nn.Module:
    # On NHWC a 1x1 conv and a dense layer compute the same thing; the choice
    # only decides the parameter layout (4-D conv vs 2-D linear weight).
    layer = dict(dtype=self.dtype, param_dtype=self.param_dtype, name=name, **kwargs)
    return nn.Dense(features, **layer) if self.use_linear else nn.Conv(features, (1, 1), **layer)
