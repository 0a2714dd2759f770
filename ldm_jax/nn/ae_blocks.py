"""Building blocks of the stage-1 autoencoders (CompVis ``diffusionmodules/model.py``).

ResnetBlock (no timestep embedding), single-head AttnBlock with 1x1-conv
q/k/v/proj_out, Downsample / Upsample, and the two containers the Encoder and
Decoder are made of: a resolution level (``down_{i}`` / ``up_{i}``) and the
middle block (``mid``). Submodule names are the reference's, so its state
dicts load through the generic rename of CONTRIBUTING.md.
"""

from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.nn.attention import dot_product_attention
from ldm_jax.nn.norm import GroupNorm

Dtype = Any
AE_NORM_EPS = 1e-6  # the reference's Normalize(): GroupNorm(32, eps=1e-6)

# PyTorch's default Conv2d weight init, kaiming_uniform(a=sqrt(5)), is
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)): training from scratch starts at the
# reference's scale (flax's lecun_normal would be sqrt(3) larger). Biases
# start at zero; PyTorch draws them from the same uniform, which does not
# matter in practice.
torch_conv_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def conv(
    features: int,
    kernel: int,
    *,
    dtype: Dtype,
    param_dtype: Dtype,
    strides: int = 1,
    padding: Any = None,
    name: str | None = None,
) -> nn.Conv:
  """A square conv with PyTorch's default init; ``padding`` defaults to "same"."""
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(strides, strides),
      padding=kernel // 2 if padding is None else padding,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=torch_conv_kernel_init,
      name=name,
  )


class _AEModule(nn.Module):
  """Fields every block shares."""

  norm_num_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _norm(self, name: str, silu: bool = False) -> GroupNorm:
    return GroupNorm(
        num_groups=self.norm_num_groups, epsilon=AE_NORM_EPS, silu=silu, param_dtype=self.param_dtype, name=name
    )

  def _conv(self, features: int, kernel: int, name: str, **kw) -> nn.Conv:
    return conv(features, kernel, dtype=self.dtype, param_dtype=self.param_dtype, name=name, **kw)


class ResnetBlock(_AEModule):
  """norm1 → swish → conv1 → norm2 → swish → dropout → conv2, plus a 1x1
  ``nin_shortcut`` on the skip path when the channel count changes."""

  out_channels: int | None = None
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, *, deterministic: bool = True) -> jax.Array:
    out_ch = self.out_channels or x_BxHxWxC.shape[-1]
    h = self._conv(out_ch, 3, "conv1")(self._norm("norm1", silu=True)(x_BxHxWxC))
    h = self._norm("norm2", silu=True)(h)
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    h = self._conv(out_ch, 3, "conv2")(h)
    skip = x_BxHxWxC
    if skip.shape[-1] != out_ch:
      skip = self._conv(out_ch, 1, "nin_shortcut")(skip)
    return skip + h


class AttnBlock(_AEModule):
  """Single-head self-attention over all pixels, 1x1-conv projections."""

  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    b, height, width, c = x_BxHxWxC.shape
    h = self._norm("norm")(x_BxHxWxC)
    # One head of width C: the default 1/sqrt(head_dim) scale is the
    # reference's int(c) ** -0.5.
    q, k, v = (self._conv(c, 1, n)(h).reshape(b, height * width, 1, c) for n in ("q", "k", "v"))
    out = dot_product_attention(q, k, v, implementation=self.attention_impl)
    return x_BxHxWxC + self._conv(c, 1, "proj_out")(out.reshape(b, height, width, c))


class Downsample(_AEModule):
  """Halves H and W: a stride-2 3x3 conv, or 2x2 average pooling."""

  with_conv: bool = True

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    if not self.with_conv:
      return nn.avg_pool(x_BxHxWxC, (2, 2), strides=(2, 2))
    # The reference pads one zero row/column at the bottom/right only
    # (PyTorch convs cannot pad asymmetrically), then convolves unpadded.
    return self._conv(x_BxHxWxC.shape[-1], 3, "conv", strides=2, padding=((0, 1), (0, 1)))(x_BxHxWxC)


class Upsample(_AEModule):
  """Doubles H and W by nearest-neighbour repetition, then a 3x3 conv."""

  with_conv: bool = True

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x_BxHxWxC, 2, axis=1), 2, axis=2)
    return self._conv(x.shape[-1], 3, "conv")(x) if self.with_conv else x


class ResolutionLevel(_AEModule):
  """One resolution of the Encoder (``down_{i}``) or Decoder (``up_{i}``):
  ``num_blocks`` ResnetBlocks, each followed by an AttnBlock when
  ``use_attn``, then an optional ``downsample`` / ``upsample``."""

  out_channels: int = 0
  num_blocks: int = 2
  use_attn: bool = False
  resample: Literal["down", "up", None] = None
  resamp_with_conv: bool = True
  dropout: float = 0.0
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, h: jax.Array, *, deterministic: bool = True) -> jax.Array:
    common = dict(norm_num_groups=self.norm_num_groups, dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(self.num_blocks):
      block = ResnetBlock(out_channels=self.out_channels, dropout=self.dropout, **common, name=f"block_{i}")
      h = block(h, deterministic=deterministic)
      if self.use_attn:
        h = AttnBlock(attention_impl=self.attention_impl, **common, name=f"attn_{i}")(h)
    if self.resample == "down":
      h = Downsample(with_conv=self.resamp_with_conv, **common, name="downsample")(h)
    elif self.resample == "up":
      h = Upsample(with_conv=self.resamp_with_conv, **common, name="upsample")(h)
    return h


class MidBlock(_AEModule):
  """``block_1`` → ``attn_1`` (unless ``use_attn`` is False) → ``block_2``."""

  use_attn: bool = True
  dropout: float = 0.0
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, h: jax.Array, *, deterministic: bool = True) -> jax.Array:
    common = dict(norm_num_groups=self.norm_num_groups, dtype=self.dtype, param_dtype=self.param_dtype)
    h = ResnetBlock(dropout=self.dropout, **common, name="block_1")(h, deterministic=deterministic)
    if self.use_attn:
      h = AttnBlock(attention_impl=self.attention_impl, **common, name="attn_1")(h)
    return ResnetBlock(dropout=self.dropout, **common, name="block_2")(h, deterministic=deterministic)
