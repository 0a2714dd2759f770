"""The FID Inception-v3 network (pytorch-fid's port of the 2015 TF graph), NHWC.

This is the network every published FID number is measured with. It differs
from torchvision's Inception-v3 in three places, all reproduced here: the
3x3 average pools of the A, C and first E blocks leave padding out of the
average (TensorFlow's ``SAME`` pooling), the last E block (``Mixed_7c``) pools
with a 3x3 *max* pool, and the classifier has 1008 classes.

Inputs are NHWC images in [-1, 1] (the range the rest of ldm_jax uses) or
``uint8`` in [0, 255], of any size: they are resized to 299x299 bilinearly
without antialiasing (``F.interpolate(..., align_corners=False)``, as
pytorch-fid does). Outputs are the 2048-d ``pool`` features (FID, KID,
precision/recall) and the 1008 class ``logits``; ``logits_unbiased`` leaves
out the fc bias, as the original Inception Score code and torch-fidelity do.

Parameter names are pytorch-fid's state-dict names (``Mixed_6b/branch7x7_2/
conv/kernel``); BatchNorm running statistics live in the ``batch_stats``
collection. The published weights are converted and read by
``ldm_jax.interop.inception``.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

INPUT_SIZE = 299
BN_EPS = 1e-3


def scaled_channels(channels: int, width_multiplier: float) -> int:
  """Channel count of a reduced-width network (``width_multiplier`` < 1 for tests)."""
  return max(1, round(channels * width_multiplier))


def _avg_pool_same(x):
  # TF-style: the zero padding is not counted in the average.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_valid(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class BasicConv2d(nn.Module):
  """Conv (no bias) -> BatchNorm (running statistics, eps 1e-3) -> ReLU."""

  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(
        self.features, self.kernel_size, strides=self.strides, padding=((ph, ph), (pw, pw)),
        use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name="conv",
    )(x)
    x = nn.BatchNorm(
        use_running_average=True, epsilon=BN_EPS, dtype=jnp.float32, param_dtype=self.param_dtype, name="bn"
    )(x.astype(jnp.float32))
    return nn.relu(x).astype(self.dtype)


class _ScaledConvs(nn.Module):
  """Shared fields and a factory for ``BasicConv2d`` layers of scaled width."""

  width_multiplier: float = 1.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.nowrap
  def conv(self, name: str, features: int, kernel_size=(1, 1), strides: int = 1, padding=(0, 0)) -> BasicConv2d:
    return BasicConv2d(
        scaled_channels(features, self.width_multiplier), kernel_size, strides, padding,
        dtype=self.dtype, param_dtype=self.param_dtype, name=name,
    )


class InceptionA(_ScaledConvs):
  pool_features: int = 32

  @nn.compact
  def __call__(self, x):
    b1 = self.conv("branch1x1", 64)(x)
    b5 = self.conv("branch5x5_2", 64, (5, 5), padding=(2, 2))(self.conv("branch5x5_1", 48)(x))
    b3 = self.conv("branch3x3dbl_1", 64)(x)
    b3 = self.conv("branch3x3dbl_2", 96, (3, 3), padding=(1, 1))(b3)
    b3 = self.conv("branch3x3dbl_3", 96, (3, 3), padding=(1, 1))(b3)
    bp = self.conv("branch_pool", self.pool_features)(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_ScaledConvs):
  @nn.compact
  def __call__(self, x):
    b3 = self.conv("branch3x3", 384, (3, 3), strides=2)(x)
    bd = self.conv("branch3x3dbl_1", 64)(x)
    bd = self.conv("branch3x3dbl_2", 96, (3, 3), padding=(1, 1))(bd)
    bd = self.conv("branch3x3dbl_3", 96, (3, 3), strides=2)(bd)
    return jnp.concatenate([b3, bd, _max_pool_valid(x)], axis=-1)


class InceptionC(_ScaledConvs):
  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = self.conv("branch1x1", 192)(x)
    b7 = self.conv("branch7x7_1", c7)(x)
    b7 = self.conv("branch7x7_2", c7, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(b7)
    bd = self.conv("branch7x7dbl_1", c7)(x)
    bd = self.conv("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(bd)
    bd = self.conv("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(bd)
    bd = self.conv("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(bd)
    bd = self.conv("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(bd)
    bp = self.conv("branch_pool", 192)(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_ScaledConvs):
  @nn.compact
  def __call__(self, x):
    b3 = self.conv("branch3x3_2", 320, (3, 3), strides=2)(self.conv("branch3x3_1", 192)(x))
    b7 = self.conv("branch7x7x3_1", 192)(x)
    b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
    b7 = self.conv("branch7x7x3_4", 192, (3, 3), strides=2)(b7)
    return jnp.concatenate([b3, b7, _max_pool_valid(x)], axis=-1)


class InceptionE(_ScaledConvs):
  """``pool="avg"`` is FIDInceptionE_1 (Mixed_7b), ``"max"`` FIDInceptionE_2 (Mixed_7c)."""

  pool: str = "avg"

  @nn.compact
  def __call__(self, x):
    b1 = self.conv("branch1x1", 320)(x)
    b3 = self.conv("branch3x3_1", 384)(x)
    b3 = jnp.concatenate([
        self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
        self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3),
    ], axis=-1)
    bd = self.conv("branch3x3dbl_1", 448)(x)
    bd = self.conv("branch3x3dbl_2", 384, (3, 3), padding=(1, 1))(bd)
    bd = jnp.concatenate([
        self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd),
        self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd),
    ], axis=-1)
    if self.pool == "avg":
      pooled = _avg_pool_same(x)
    elif self.pool == "max":
      # The FID graph's quirk: a max pool where the paper has an average pool.
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      raise ValueError(f"InceptionE pool must be 'avg' or 'max', got {self.pool!r}")
    bp = self.conv("branch_pool", 192)(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def preprocess_for_inception(images_BxHxWx3: jax.Array, resize: bool = True) -> jax.Array:
  """[-1, 1] floats or uint8 images -> float32 [-1, 1], at 299x299 (bilinear, no antialias) if ``resize``."""
  if images_BxHxWx3.ndim != 4 or images_BxHxWx3.shape[-1] != 3:
    raise ValueError(f"Inception expects NHWC RGB images (B, H, W, 3), got shape {images_BxHxWx3.shape}")
  x = images_BxHxWx3
  x = x.astype(jnp.float32) / 127.5 - 1.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
  b, h, w, c = x.shape
  if resize and (h, w) != (INPUT_SIZE, INPUT_SIZE):
    # Bilinear interpolation commutes with affine maps of the values, so
    # resizing in [-1, 1] equals pytorch-fid's resize in [0, 1], then 2x - 1.
    x = jax.image.resize(x, (b, INPUT_SIZE, INPUT_SIZE, c), "bilinear", antialias=False)
  return x


class InceptionV3(_ScaledConvs):
  """FID Inception-v3: images -> ``{"pool", "logits", "logits_unbiased"}``.

  ``width_multiplier`` < 1 shrinks every layer (tests and demos only: the
  published weights are ``1.0``).
  """

  num_classes: int = 1008
  resize_input: bool = True

  @nn.compact
  def __call__(self, images_BxHxWx3: jax.Array) -> dict[str, jax.Array]:
    x = preprocess_for_inception(images_BxHxWx3, self.resize_input).astype(self.dtype)
    common = dict(width_multiplier=self.width_multiplier, dtype=self.dtype, param_dtype=self.param_dtype)
    x = self.conv("Conv2d_1a_3x3", 32, (3, 3), 2)(x)
    x = self.conv("Conv2d_2a_3x3", 32, (3, 3))(x)
    x = self.conv("Conv2d_2b_3x3", 64, (3, 3), 1, (1, 1))(x)
    x = _max_pool_valid(x)
    x = self.conv("Conv2d_3b_1x1", 80, (1, 1))(x)
    x = self.conv("Conv2d_4a_3x3", 192, (3, 3))(x)
    x = _max_pool_valid(x)
    x = InceptionA(pool_features=32, **common, name="Mixed_5b")(x)
    x = InceptionA(pool_features=64, **common, name="Mixed_5c")(x)
    x = InceptionA(pool_features=64, **common, name="Mixed_5d")(x)
    x = InceptionB(**common, name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(channels_7x7=c7, **common, name=name)(x)
    x = InceptionD(**common, name="Mixed_7a")(x)
    x = InceptionE(pool="avg", **common, name="Mixed_7b")(x)
    x = InceptionE(pool="max", **common, name="Mixed_7c")(x)
    pool_BxF = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    fc = nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=self.param_dtype, name="fc")
    logits = fc(pool_BxF)
    logits_unbiased = pool_BxF @ fc.variables["params"]["kernel"]
    return {"pool": pool_BxF, "logits": logits, "logits_unbiased": logits_unbiased}


@functools.lru_cache(maxsize=4)  # tracing the full network takes seconds; converting then loading needs it twice
def variables_template(model: InceptionV3) -> dict[str, Any]:
  """Shapes of ``model``'s variables (no allocation)."""
  images = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), images)
