"""LPIPS perceptual distance (VGG16 variant, as in taming / richzhang's lpips).

VGG16 features at relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 of both
images (inputs in [-1, 1], shifted and scaled by the reference
ScalingLayer), unit-normalised over channels, squared differences weighted
by the non-negative 1x1 ``lin`` heads, averaged over space and summed over
the five layers: one distance per image.

The network is frozen. Its weights come from torchvision's ImageNet VGG16
and lpips' ``weights/v0.1/vgg.pth``, converted once by ``ldm_jax.interop.lpips``.
Params mirror their names: ``features_{i}/kernel`` for ``features.{i}.weight``,
``lin{k}/model_1/kernel`` for ``lin{k}.model.1.weight``.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Params = dict[str, Any]

# torchvision vgg16.features conv indices, grouped by the five LPIPS slices;
# a 2x2 max-pool precedes every slice but the first.
VGG16_SLICES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
VGG16_CHANNELS = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10


def normalize_channels(x: jax.Array) -> jax.Array:
  """x / (|x|_2 over channels + 1e-10), as the reference ``normalize_tensor``."""
  sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  # Same value as sqrt(sq); avoids the NaN gradient of sqrt at an all-zero pixel.
  positive = sq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
  return x / (norm + NORM_EPS)


class _NetLinLayer(nn.Module):
  """The reference NetLinLayer: Dropout (index 0, off in eval) then a
  bias-free 1x1 conv to one channel (index 1)."""

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Conv(1, (1, 1), use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name="model_1")(x)


class LPIPS(nn.Module):
  """``LPIPS()(x, y) -> [B]`` for NHWC RGB images in [-1, 1]."""

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWx3: jax.Array, y_BxHxWx3: jax.Array) -> jax.Array:
    if x_BxHxWx3.shape != y_BxHxWx3.shape or x_BxHxWx3.ndim != 4 or x_BxHxWx3.shape[-1] != 3:
      raise ValueError(f"LPIPS expects two NHWC RGB batches of one shape, got {x_BxHxWx3.shape} and {y_BxHxWx3.shape}")
    if min(x_BxHxWx3.shape[1:3]) < 16:  # four 2x2 max-pools before relu5_3
      raise ValueError(f"LPIPS needs images of at least 16x16, got {x_BxHxWx3.shape[1]}x{x_BxHxWx3.shape[2]}")
    batch = x_BxHxWx3.shape[0]
    # Both images through one VGG pass.
    h = jnp.concatenate([x_BxHxWx3, y_BxHxWx3]).astype(jnp.float32)
    h = ((h - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)).astype(self.dtype)
    total = jnp.zeros((batch,), jnp.float32)
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for k, (indices, channels) in enumerate(zip(VGG16_SLICES, VGG16_CHANNELS)):
      if k:
        h = nn.max_pool(h, (2, 2), strides=(2, 2))
      for i in indices:
        conv = nn.Conv(channels, (3, 3), padding=1, name=f"features_{i}", **dtypes)
        h = nn.relu(conv(h))
      feats = normalize_channels(h.astype(jnp.float32))
      diff = jnp.square(feats[:batch] - feats[batch:])
      lin = _NetLinLayer(name=f"lin{k}", **dtypes)
      total = total + jnp.mean(lin(diff)[..., 0].astype(jnp.float32), axis=(1, 2))
    return total


def lpips_template() -> Params:
  """Shapes of the LPIPS params (no allocation)."""
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  return jax.eval_shape(LPIPS().init, jax.random.key(0), x, x)["params"]


def make_lpips_fn(params: Params, dtype: Dtype = jnp.float32) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """``fn(x, y) -> [B]`` with the weights frozen (no gradient reaches them)."""
  model = LPIPS(dtype=dtype)

  def lpips_fn(x: jax.Array, y: jax.Array) -> jax.Array:
    return model.apply({"params": jax.lax.stop_gradient(params)}, x, y)

  return lpips_fn
