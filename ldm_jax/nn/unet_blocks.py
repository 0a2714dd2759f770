"""The UNet's convolutional blocks, after the LDM reference ``openaimodel.py``.

``ResBlock`` (time-conditioned residual block, optional FiLM-style scale-shift
norm and built-in up/down sampling), ``Downsample``, ``Upsample`` and the
pre-transformer ``AttentionBlock`` with both of the reference's qkv channel
orders. NHWC; submodule names are the reference state-dict names
(``in_layers_0``, ``emb_layers_1``, ``op``, ``qkv``, ...).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.nn.attention import Implementation, dot_product_attention
from ldm_jax.nn.norm import GroupNorm

# The reference's ``normalization(ch)`` is GroupNorm32 with PyTorch's default eps.
UNET_NORM_EPS = 1e-5


def upsample_nearest_2x(x_BxHxWxC: jax.Array) -> jax.Array:
  """Nearest-neighbour 2x upsampling (``F.interpolate(scale_factor=2)``)."""
  return jnp.repeat(jnp.repeat(x_BxHxWxC, 2, axis=1), 2, axis=2)


def avg_pool_2x(x_BxHxWxC: jax.Array) -> jax.Array:
  """2x2 average pooling with stride 2 (``avg_pool_nd(kernel_size=2)``)."""
  return nn.avg_pool(x_BxHxWxC, (2, 2), strides=(2, 2))


class Downsample(nn.Module):
  """Halves H and W: a stride-2 3x3 conv ``op``, or 2x2 average pooling."""

  use_conv: bool = True
  out_channels: int | None = None  # conv output channels; default: unchanged
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    if not self.use_conv:
      return avg_pool_2x(x_BxHxWxC)
    features = self.out_channels or x_BxHxWxC.shape[-1]
    return nn.Conv(
        features, (3, 3), strides=2, padding=1, dtype=self.dtype, param_dtype=self.param_dtype, name="op"
    )(x_BxHxWxC)


class Upsample(nn.Module):
  """Doubles H and W by nearest-neighbour repetition, then an optional 3x3 ``conv``."""

  use_conv: bool = True
  out_channels: int | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    h = upsample_nearest_2x(x_BxHxWxC)
    if not self.use_conv:
      return h
    features = self.out_channels or x_BxHxWxC.shape[-1]
    return nn.Conv(features, (3, 3), padding=1, dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(h)


class ResBlock(nn.Module):
  """Residual block conditioned on the time embedding.

  ``norm -> SiLU -> [up|down] -> conv``, then the embedding is added (or, with
  ``use_scale_shift_norm``, applied as ``norm(h) * (1 + scale) + shift``),
  ``-> norm -> SiLU -> dropout -> zero-initialised conv``, plus a skip path
  (1x1 conv when the channel count changes). ``deterministic`` is a field, not
  a call argument, so that ``nn.remat`` needs no static arguments.
  """

  out_channels: int | None = None
  dropout: float = 0.0
  use_scale_shift_norm: bool = False
  up: bool = False
  down: bool = False
  norm_num_groups: int = 32
  deterministic: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def _norm(self, name: str, silu: bool = False) -> GroupNorm:
    return GroupNorm(
        num_groups=self.norm_num_groups, epsilon=UNET_NORM_EPS, silu=silu, param_dtype=self.param_dtype, name=name
    )

  def _conv(self, features: int, kernel: int, name: str, **kwargs) -> nn.Conv:
    return nn.Conv(
        features, (kernel, kernel), padding=kernel // 2, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        **kwargs,
    )

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, emb_BxE: jax.Array) -> jax.Array:
    if self.up and self.down:
      raise ValueError("ResBlock: up and down are mutually exclusive")
    x = x_BxHxWxC.astype(self.dtype)
    out_channels = self.out_channels or x.shape[-1]
    h = self._norm("in_layers_0", silu=True)(x)
    # The reference resamples between the activation and the conv, and the skip path too.
    if self.up:
      h, x = upsample_nearest_2x(h), upsample_nearest_2x(x)
    elif self.down:
      h, x = avg_pool_2x(h), avg_pool_2x(x)
    h = self._conv(out_channels, 3, "in_layers_2")(h)

    emb_features = 2 * out_channels if self.use_scale_shift_norm else out_channels
    emb_out = nn.Dense(emb_features, dtype=self.dtype, param_dtype=self.param_dtype, name="emb_layers_1")(
        nn.silu(emb_BxE)
    )[:, None, None, :]
    if self.use_scale_shift_norm:
      scale, shift = jnp.split(emb_out, 2, axis=-1)
      h = nn.silu(self._norm("out_layers_0")(h) * (1 + scale) + shift)
    else:
      h = self._norm("out_layers_0", silu=True)(h + emb_out)
    h = nn.Dropout(self.dropout, name="out_layers_2")(h, deterministic=self.deterministic)
    h = self._conv(out_channels, 3, "out_layers_3", kernel_init=nn.initializers.zeros_init())(h)

    if out_channels != x.shape[-1]:
      x = self._conv(out_channels, 1, "skip_connection")(x)
    return x + h


class AttentionBlock(nn.Module):
  """Spatial self-attention of the pre-transformer LDMs (``openaimodel.AttentionBlock``).

  ``qkv`` and ``proj_out`` are 1-D convs with kernel size 1 over the flattened
  positions (their PyTorch weights are 3-D). With ``num_head_channels == -1``
  the block has ``num_heads`` heads, otherwise ``C // num_head_channels``.
  The fused qkv channels are read per head then q/k/v (``QKVAttentionLegacy``)
  or q/k/v then per head (``use_new_attention_order``, ``QKVAttention``).
  """

  num_heads: int = 1
  num_head_channels: int = -1
  use_new_attention_order: bool = False
  norm_num_groups: int = 32
  attention_impl: Implementation = "auto"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    b, height, width, c = x_BxHxWxC.shape
    heads = self.num_heads if self.num_head_channels == -1 else c // max(self.num_head_channels, 1)
    if heads < 1 or c % heads or (self.num_head_channels != -1 and c % self.num_head_channels):
      raise ValueError(
          f"AttentionBlock: {c} channels cannot be split into heads "
          f"(num_heads={self.num_heads}, num_head_channels={self.num_head_channels})"
      )
    head_dim = c // heads
    x_BxTxC = x_BxHxWxC.astype(self.dtype).reshape(b, height * width, c)
    h = GroupNorm(num_groups=self.norm_num_groups, epsilon=UNET_NORM_EPS, param_dtype=self.param_dtype, name="norm")(
        x_BxTxC
    )
    qkv = nn.Conv(3 * c, (1,), dtype=self.dtype, param_dtype=self.param_dtype, name="qkv")(h)
    if self.use_new_attention_order:
      qkv_BxTx3xNxH = qkv.reshape(b, height * width, 3, heads, head_dim)
      q, k, v = (qkv_BxTx3xNxH[:, :, i] for i in range(3))
    else:
      qkv_BxTxNx3xH = qkv.reshape(b, height * width, heads, 3, head_dim)
      q, k, v = (qkv_BxTxNx3xH[:, :, :, i] for i in range(3))
    a_BxTxNxH = dot_product_attention(q, k, v, implementation=self.attention_impl)
    h = nn.Conv(
        c, (1,), dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=nn.initializers.zeros_init(),
        name="proj_out",
    )(a_BxTxNxH.reshape(b, height * width, c))
    return (x_BxTxC + h).reshape(b, height, width, c)
