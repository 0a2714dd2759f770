"""Full-reference image quality: PSNR and SSIM, per image, in JAX.

Images are NHWC in ``value_range`` ([-1, 1] by default, the project's range;
pass ``(0, 1)`` or ``(0, 255)`` otherwise) and are mapped onto [0, 1] first.
PSNR does not notice. SSIM is defined for intensities in [0, L]: its
luminance term is not shift-invariant, so SSIM of [-1, 1] values with L = 2
would differ from the standard number, which this mapping reproduces.

SSIM is the standard definition of Wang et al. (2004): an 11x11 Gaussian
window with sigma 1.5, K1 = 0.01, K2 = 0.03, population (biased) local
statistics, only windows that lie inside the image ("valid"), averaged over
positions and channels. It equals scikit-image's ``structural_similarity``
with ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _to_unit_range(images, value_range: tuple[float, float], name: str) -> jax.Array:
  lo, hi = value_range
  if not hi > lo:
    raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
  x = jnp.asarray(images, jnp.float32)
  if x.ndim != 4:
    raise ValueError(f"{name} must be NHWC images (B, H, W, C), got shape {x.shape}")
  return (x - lo) / (hi - lo)


def _pair(a, b, value_range):
  a, b = _to_unit_range(a, value_range, "images_a"), _to_unit_range(b, value_range, "images_b")
  if a.shape != b.shape:
    raise ValueError(f"image batches differ in shape: {a.shape} vs {b.shape}")
  return a, b


@functools.partial(jax.jit, static_argnames="value_range")
def psnr(images_a, images_b, *, value_range: tuple[float, float] = (-1.0, 1.0)) -> jax.Array:
  """Peak signal-to-noise ratio in dB, ``10 log10(1 / MSE)`` on [0, 1], shape (B,)."""
  a, b = _pair(images_a, images_b, value_range)
  mse = jnp.mean((a - b) ** 2, axis=(1, 2, 3))
  return -10.0 * jnp.log10(mse)  # +inf for identical images, as the definition says


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  """Normalised 1-D Gaussian taps; the 2-D window is their outer product."""
  x = np.arange(size, dtype=np.float64) - (size - 1) / 2
  g = np.exp(-(x**2) / (2 * sigma**2))
  return (g / g.sum()).astype(np.float32)


def _filter_valid(x_BxHxWxC: jax.Array, taps: np.ndarray) -> jax.Array:
  """Separable 'valid' correlation with ``taps`` along H, then W."""
  k = len(taps)
  h, w = x_BxHxWxC.shape[1:3]
  x = sum(t * x_BxHxWxC[:, i: h - k + 1 + i] for i, t in enumerate(taps))
  return sum(t * x[:, :, i: w - k + 1 + i] for i, t in enumerate(taps))


@functools.partial(jax.jit, static_argnames=("value_range", "window_size", "sigma", "k1", "k2"))
def ssim(
    images_a, images_b, *, value_range: tuple[float, float] = (-1.0, 1.0),
    window_size: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03,
) -> jax.Array:
  """Structural similarity per image, shape (B,)."""
  a, b = _pair(images_a, images_b, value_range)
  if min(a.shape[1:3]) < window_size:
    raise ValueError(f"SSIM needs images of at least {window_size}x{window_size} pixels, got {a.shape[1:3]}")
  taps = gaussian_window(window_size, sigma)
  blur = lambda x: _filter_valid(x, taps)  # noqa: E731
  mu_a, mu_b = blur(a), blur(b)
  var_a = blur(a * a) - mu_a**2
  var_b = blur(b * b) - mu_b**2
  cov = blur(a * b) - mu_a * mu_b
  c1, c2 = k1**2, k2**2  # data range 1 after _to_unit_range
  ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
  return jnp.mean(ssim_map, axis=(1, 2, 3))
