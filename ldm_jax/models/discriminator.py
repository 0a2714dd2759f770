"""PatchGAN discriminator of the stage-1 loss (taming's NLayerDiscriminator).

Layer names are the indices of the reference ``nn.Sequential`` (``main_0``,
``main_2``, ``main_3``, ...). With BatchNorm (the default, as the reference)
the module has a ``batch_stats`` collection: apply with ``train=True`` and
``mutable=["batch_stats"]`` and thread the new statistics through the train
step. Call it separately on real and on fake images, as the reference does,
so each gets its own batch statistics.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
KERNEL_SIZE, PADDING, LEAKY_SLOPE = 4, 1, 0.2

# The reference's weights_init: conv weights N(0, 0.02), BatchNorm scale
# N(1, 0.02) and bias 0. (Conv biases keep PyTorch's default uniform init
# there; here they start at zero.)
_conv_init = nn.initializers.normal(0.02)


def _bn_scale_init(key, shape, dtype=jnp.float32):
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class ActNorm(nn.Module):
  """Per-channel affine ``scale * (x + loc)`` with data-dependent init: the
  batch given to ``init`` sets loc = -mean and scale = 1 / (std + 1e-6),
  which is what the reference does on its first training batch."""

  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    x32 = x_BxHxWxC.astype(jnp.float32)
    loc = self.param("loc", lambda _: (-jnp.mean(x32, axis=(0, 1, 2))).astype(self.param_dtype))
    scale = self.param(
        "scale", lambda _: (1.0 / (jnp.std(x32, axis=(0, 1, 2), ddof=1) + 1e-6)).astype(self.param_dtype)
    )
    return (scale * (x32 + loc)).astype(x_BxHxWxC.dtype)


def patch_logits_size(size: int, n_layers: int) -> int:
  """Side of the logit map for an input side ``size``."""
  for _ in range(n_layers):
    size = (size + 2 * PADDING - KERNEL_SIZE) // 2 + 1
  return size - 2 * (KERNEL_SIZE - 2 * PADDING - 1)  # two stride-1 convs


class NLayerDiscriminator(nn.Module):
  """conv(stride 2) → LeakyReLU, then ``n_layers`` conv → norm → LeakyReLU
  (channels ndf·min(2^n, 8); stride 2 except the last), then a 1-channel
  conv: one real/fake logit per overlapping patch, shape [B, h, w, 1]."""

  input_nc: int = 3
  ndf: int = 64
  n_layers: int = 3
  use_actnorm: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _conv(self, features: int, strides: int, use_bias: bool, index: int) -> nn.Conv:
    return nn.Conv(
        features,
        (KERNEL_SIZE, KERNEL_SIZE),
        strides=(strides, strides),
        padding=PADDING,
        use_bias=use_bias,
        kernel_init=_conv_init,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=f"main_{index}",
    )

  def _norm(self, h: jax.Array, train: bool, index: int) -> jax.Array:
    if self.use_actnorm:
      return ActNorm(param_dtype=self.param_dtype, name=f"main_{index}")(h)
    # PyTorch BatchNorm2d defaults: momentum 0.1 (flax 0.9), eps 1e-5;
    # statistics in float32.
    bn = nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        use_fast_variance=False,
        scale_init=_bn_scale_init,
        dtype=jnp.float32,
        param_dtype=self.param_dtype,
        name=f"main_{index}",
    )
    return bn(h.astype(jnp.float32)).astype(h.dtype)

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, *, train: bool = True) -> jax.Array:
    if x_BxHxWxC.ndim != 4 or x_BxHxWxC.shape[-1] != self.input_nc:
      raise ValueError(
          f"NLayerDiscriminator expects NHWC images with {self.input_nc} channels, got {x_BxHxWxC.shape}"
      )
    if min(patch_logits_size(s, self.n_layers) for s in x_BxHxWxC.shape[1:3]) < 1:
      height, width = x_BxHxWxC.shape[1:3]
      raise ValueError(f"images of {height}x{width} are too small for n_layers={self.n_layers}")
    h = nn.leaky_relu(self._conv(self.ndf, 2, True, 0)(x_BxHxWxC), LEAKY_SLOPE)
    index = 2
    for n in range(1, self.n_layers + 1):
      # BatchNorm has its own shift, so those convs go without bias.
      h = self._conv(self.ndf * min(2**n, 8), 2 if n < self.n_layers else 1, self.use_actnorm, index)(h)
      h = nn.leaky_relu(self._norm(h, train, index + 1), LEAKY_SLOPE)
      index += 3
    return self._conv(1, 1, True, index)(h)
