"""Low-resolution inputs for super-resolution, made on the host from the (cropped) image.

- ``bicubic_downsample``: Pillow's antialiased bicubic, the simple degradation.
- ``bsr_degrade``: the LDM-BSR degradation the paper's 4x super-resolution model is
  trained with: ``degradation_bsrgan_variant`` of CompVis/latent-diffusion's
  ``ldm/modules/image_degradation/bsrgan_light.py`` (after BSRGAN, Zhang et al. 2021):
  Gaussian blur (isotropic or anisotropic), a random downsampling, the exact
  downsampling to the target size, light Gaussian noise and JPEG compression, in a
  random order (the two downsamplings keep theirs), then a last JPEG round.

Every random choice comes from the ``np.random.Generator`` passed in, so a record's
low-res input is a pure function of (seed, index): ``np.random.default_rng([seed, index])``.
Images here are float (H, W, C) in [0, 1] between steps, uint8 at the ends.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image
from scipy import ndimage

from ldm_jax.data.transforms import to_unit_range

LOW_RES_KINDS = ("device_bicubic", "bicubic", "bsr")  # "device_bicubic": the train step resizes, not the data

# The reference's constants (bsrgan_light.degradation_bsrgan_variant and helpers).
SCALE2_PROB = 0.25  # factor 4 only: first halve the image, then degrade by 2
DOWNSAMPLE2_RESIZE_PROB = 0.8  # else: blur with a shifted Gaussian and keep every factor-th pixel
JPEG_PROB = 0.9  # the JPEG step in the shuffled order; a final JPEG round always follows
JPEG_QUALITY = (80, 95)  # inclusive
NOISE_LEVELS = (1, 2)  # inclusive, in 1/255: the light variant's noise_level1, noise_level2
INTERPOLATIONS = ("linear", "cubic", "area")  # cv2 flags 1, 2, 3, drawn uniformly


# ----------------------------------------------------------------------------- kernels

def gaussian_kernel(size: int, cov_2x2: np.ndarray, center: tuple[float, float] | None = None) -> np.ndarray:
  """(size, size) Gaussian with covariance ``cov_2x2`` over (x, y), sampled at pixel offsets from
  ``center`` (default the middle, ``(size - 1) / 2``), normalised to sum 1.

  Computed in log space so that a near-singular covariance gives a delta, not 0/0.
  """
  cy, cx = ((size - 1) / 2.0,) * 2 if center is None else center
  y, x = np.mgrid[0:size, 0:size].astype(np.float64)
  d = np.stack([x - cx, y - cy], axis=-1)
  cov = np.asarray(cov_2x2, np.float64) + 1e-9 * np.eye(2)
  log_k = -0.5 * np.einsum("...i,ij,...j->...", d, np.linalg.inv(cov), d)
  k = np.exp(log_k - log_k.max())
  return k / k.sum()


def anisotropic_gaussian_kernel(size: int, theta: float, var1: float, var2: float) -> np.ndarray:
  """Gaussian whose covariance has eigenvalues ``var1``, ``var2`` along axes rotated by ``theta``."""
  rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
  return gaussian_kernel(size, rot @ np.diag([var1, var2]) @ rot.T)


def isotropic_gaussian_kernel(size: int, sigma: float) -> np.ndarray:
  """MATLAB's ``fspecial('gaussian', size, sigma)``, as the reference uses it."""
  return gaussian_kernel(size, np.eye(2) * sigma**2)


def random_blur_kernel(rng: np.random.Generator, factor: int) -> np.ndarray:
  """The light variant's ``add_blur``: half anisotropic (5-14 px, variances up to (4 + f) / 4),
  half isotropic (5-7 px, sigma up to (2 + 0.2 f) / 4)."""
  max_var, max_sigma = (4.0 + factor) / 4.0, (2.0 + 0.2 * factor) / 4.0
  if rng.random() < 0.5:
    var1, var2 = max_var * rng.random(), max_var * rng.random()
    size = int(rng.integers(5, 15))
    return anisotropic_gaussian_kernel(size, rng.random() * np.pi, var1, var2)
  size = int(rng.integers(5, 8))
  return isotropic_gaussian_kernel(size, max_sigma * rng.random())


def blur(image_HxWxC: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  """Convolves each channel with ``kernel``, mirroring at the borders (scipy's mode 'mirror', as the reference)."""
  out = np.empty_like(image_HxWxC)
  for c in range(image_HxWxC.shape[-1]):
    out[..., c] = ndimage.convolve(image_HxWxC[..., c], kernel, mode="mirror")
  return out


# ----------------------------------------------------------------------------- resizing

def _cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  # OpenCV's INTER_CUBIC kernel (A = -0.75).
  t = np.abs(t)
  near = ((a + 2) * t - (a + 3)) * t * t + 1
  far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
  return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def resize_weights(in_size: int, out_size: int, method: str) -> np.ndarray:
  """(out_size, in_size) weights of one axis of OpenCV's ``resize`` (no antialiasing for linear/cubic).

  ``linear``/``cubic`` sample input coordinate ``(i + 0.5) * in / out - 0.5`` with replicated
  borders; ``area`` averages the input pixels weighted by their overlap with output pixel ``i``.
  """
  if method not in INTERPOLATIONS:
    raise ValueError(f"resize method must be one of {INTERPOLATIONS}, got {method!r}")
  scale = in_size / out_size
  rows = np.arange(out_size)
  weights = np.zeros((out_size, in_size))
  if method == "area":
    lo, hi = rows[:, None] * scale, (rows[:, None] + 1) * scale
    cols = np.arange(in_size)[None, :]
    return np.clip(np.minimum(hi, cols + 1) - np.maximum(lo, cols), 0, None) / scale
  src = (rows + 0.5) * scale - 0.5
  base = np.floor(src).astype(int)
  taps = (0, 1) if method == "linear" else (-1, 0, 1, 2)
  for offset in taps:
    tap = base + offset
    t = src - tap
    w = np.maximum(1 - np.abs(t), 0) if method == "linear" else _cubic(t)
    np.add.at(weights, (rows, np.clip(tap, 0, in_size - 1)), w)
  return weights


def resize(image_HxWxC: np.ndarray, height: int, width: int, method: str) -> np.ndarray:
  """Float image resized to (height, width) with ``method`` in ``INTERPOLATIONS``."""
  wy = resize_weights(image_HxWxC.shape[0], height, method)
  wx = resize_weights(image_HxWxC.shape[1], width, method)
  h, w, c = image_HxWxC.shape
  rows = (wy.astype(np.float32) @ image_HxWxC.astype(np.float32).reshape(h, w * c)).reshape(height, w, c)
  cols = np.swapaxes(rows, 1, 2).reshape(height * c, w) @ wx.T.astype(np.float32)  # (height * C, width)
  return np.ascontiguousarray(np.swapaxes(cols.reshape(height, c, width), 1, 2))


def _random_resize(image: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
  method = INTERPOLATIONS[int(rng.integers(len(INTERPOLATIONS)))]
  return np.clip(resize(image, max(1, height), max(1, width), method), 0.0, 1.0)


def _pil_resize_float(image: np.ndarray, height: int, width: int, resample: Image.Resampling) -> np.ndarray:
  # Pillow's float ("F") mode keeps full precision; one channel at a time.
  channels = [np.asarray(Image.fromarray(image[..., c].astype(np.float32)).resize((width, height), resample))
              for c in range(image.shape[-1])]
  return np.stack(channels, axis=-1)


# ----------------------------------------------------------------------------- noise and JPEG

def add_gaussian_noise(image: np.ndarray, rng: np.random.Generator, min_level: int = NOISE_LEVELS[0],
                       max_level: int = NOISE_LEVELS[1]) -> np.ndarray:
  """The reference's ``add_Gaussian_noise``: a level in [min_level, max_level] / 255, then 40% colour
  noise, 40% grey noise (one draw for all channels), 20% noise correlated across channels (covariance
  ``|L^2 U^T D U|`` with L = max_level / 255, U orthogonal and D uniform diagonal)."""
  level = int(rng.integers(min_level, max_level + 1)) / 255.0
  u = rng.random()
  if u > 0.6:
    noise = rng.normal(0.0, level, image.shape)
  elif u < 0.4:
    noise = rng.normal(0.0, level, (*image.shape[:2], 1))
  else:
    orth, _ = np.linalg.qr(rng.random((3, 3)))
    cov = np.abs((max_level / 255.0) ** 2 * orth.T @ np.diag(rng.random(3)) @ orth)
    # abs() can break positive semi-definiteness; sample through the clipped eigen-decomposition.
    vals, vecs = np.linalg.eigh(cov)
    noise = rng.standard_normal((*image.shape[:2], 3)) @ (vecs * np.sqrt(np.clip(vals, 0, None))).T
  return np.clip(image + noise.astype(np.float32), 0.0, 1.0)


def to_uint8(image: np.ndarray) -> np.ndarray:
  """[0, 1] floats to uint8, rounding (the reference's ``single2uint``)."""
  return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def jpeg_compress(image: np.ndarray, quality: int) -> np.ndarray:
  """One JPEG encode/decode round at ``quality`` (Pillow; 4:2:0 chroma as OpenCV's default)."""
  buffer = io.BytesIO()
  Image.fromarray(to_uint8(image)).save(buffer, format="JPEG", quality=int(quality))
  return np.asarray(Image.open(buffer).convert("RGB"), np.float32) / 255.0


def _random_jpeg(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  return jpeg_compress(image, int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1)))


# ----------------------------------------------------------------------------- the degradations

def _shifted_downsample(image: np.ndarray, factor: int, rng: np.random.Generator) -> np.ndarray:
  # A 25 px Gaussian shifted by (f - 1) / 2 towards the top left, then every f-th pixel: each kept
  # pixel is the blurred centre of its f x f block. Separable, so two 1-D passes.
  sigma = rng.uniform(0.1, 0.6 * factor)
  taps = np.arange(25) - (12 - (factor - 1) / 2.0)
  k = np.exp(-0.5 * (taps / sigma) ** 2)
  k /= k.sum()
  out = ndimage.convolve1d(ndimage.convolve1d(image, k, axis=0, mode="mirror"), k, axis=1, mode="mirror")
  return np.clip(out[::factor, ::factor], 0.0, 1.0)


def bsr_degrade(image_uint8: np.ndarray, factor: int, rng: np.random.Generator) -> np.ndarray:
  """The LDM-BSR degradation of an (H, W, 3) uint8 image: uint8 (H / factor, W / factor, 3)."""
  height, width = image_uint8.shape[:2]
  if height % factor or width % factor:
    raise ValueError(f"image size {height}x{width} is not divisible by the low-res factor {factor}")
  image = image_uint8.astype(np.float32) / 255.0
  sf = factor
  if sf == 4 and rng.random() < SCALE2_PROB:
    if rng.random() < 0.5:
      image = _random_resize(image, height // 2, width // 2, rng)
    else:  # MATLAB's antialiased bicubic imresize
      image = np.clip(_pil_resize_float(image, height // 2, width // 2, Image.Resampling.BICUBIC), 0.0, 1.0)
    sf = 2
  order = list(rng.permutation(7))
  i2, i3 = order.index(2), order.index(3)
  if i2 > i3:  # the exact downsampling (3) comes after the random one (2)
    order[i2], order[i3] = 3, 2
  size_before = image.shape[:2]
  for op in order:  # 1 and 6 are the full model's second blur and camera noise: not in the light variant
    if op == 0:
      image = np.clip(blur(image, random_blur_kernel(rng, sf)), 0.0, 1.0)
    elif op == 2:
      size_before = image.shape[:2]
      if rng.random() < DOWNSAMPLE2_RESIZE_PROB:
        s = rng.uniform(1, 2 * sf)
        image = _random_resize(image, int(image.shape[0] / s), int(image.shape[1] / s), rng)
      else:
        image = _shifted_downsample(image, sf, rng)
    elif op == 3:
      image = _random_resize(image, size_before[0] // sf, size_before[1] // sf, rng)
    elif op == 4:
      image = add_gaussian_noise(image, rng)
    elif op == 5 and rng.random() < JPEG_PROB:
      image = _random_jpeg(image, rng)
  return to_uint8(_random_jpeg(image, rng))


def bicubic_downsample(image_uint8: np.ndarray, factor: int) -> np.ndarray:
  """Pillow's antialiased bicubic to (H / factor, W / factor): uint8."""
  height, width = image_uint8.shape[:2]
  if height % factor or width % factor:
    raise ValueError(f"image size {height}x{width} is not divisible by the low-res factor {factor}")
  return np.asarray(Image.fromarray(image_uint8).resize((width // factor, height // factor), Image.Resampling.BICUBIC))


@dataclasses.dataclass(frozen=True)
class LowRes:
  """The ``data.conditioning.low_res`` transform: uint8 image -> float32 [-1, 1] low-res image."""

  kind: str
  factor: int

  def __post_init__(self):
    if self.kind not in LOW_RES_KINDS[1:]:
      raise ValueError(f"host low-res kind must be one of {LOW_RES_KINDS[1:]}, got {self.kind!r}")
    if isinstance(self.factor, bool) or not isinstance(self.factor, int) or self.factor < 1:
      raise ValueError(f"data.conditioning.low_res_factor must be a positive integer, got {self.factor!r}")

  def __call__(self, image_uint8: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if self.kind == "bsr":
      return to_unit_range(bsr_degrade(image_uint8, self.factor, rng))
    return to_unit_range(bicubic_downsample(image_uint8, self.factor))
