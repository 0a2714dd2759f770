"""PSNR against its closed form, SSIM against an independent float64 NumPy implementation."""

import numpy as np
import pytest
from scipy.signal import correlate2d

from ldm_jax.evaluation import image_metrics as im


def _ssim_reference(a, b, data_range):
  """Wang et al. 2004 with a 2-D 11x11 Gaussian window (sigma 1.5), 'valid' windows, float64.

  Intensities must lie in [0, data_range].
  """
  x = np.arange(11) - 5.0
  window = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * 1.5**2))
  window /= window.sum()
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  out = []
  for img_a, img_b in zip(a.astype(np.float64), b.astype(np.float64)):
    maps = []
    for c in range(img_a.shape[-1]):
      f = lambda z: correlate2d(z, window, mode="valid")  # noqa: E731
      p, q = img_a[..., c], img_b[..., c]
      mp, mq = f(p), f(q)
      vp, vq, cov = f(p * p) - mp**2, f(q * q) - mq**2, f(p * q) - mp * mq
      maps.append(((2 * mp * mq + c1) * (2 * cov + c2)) / ((mp**2 + mq**2 + c1) * (vp + vq + c2)))
    out.append(np.mean(maps))
  return np.array(out)


@pytest.fixture(scope="module")
def image_pair():
  rng = np.random.default_rng(0)
  clean = rng.uniform(-1, 1, size=(3, 24, 20, 3)).astype(np.float32)
  smooth = (clean + np.roll(clean, 1, axis=1) + np.roll(clean, 1, axis=2)) / 3  # some structure
  noisy = np.clip(smooth + rng.normal(scale=[[[[0.05]]], [[[0.2]]], [[[0.5]]]], size=smooth.shape), -1, 1)
  return smooth.astype(np.float32), noisy.astype(np.float32)


def test_psnr_closed_form(image_pair):
  a, b = image_pair
  mse_unit = np.mean(((a.astype(np.float64) - b) / 2) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(im.psnr(a, b), 10 * np.log10(1 / mse_unit), rtol=1e-5)
  # The same images in [0, 255] give the same PSNR (peak 255).
  a255, b255 = (a + 1) * 127.5, (b + 1) * 127.5
  mse255 = np.mean((a255.astype(np.float64) - b255) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(im.psnr(a255, b255, value_range=(0, 255)), 10 * np.log10(255**2 / mse255), rtol=1e-5)


def test_ssim_matches_numpy_reference(image_pair):
  a, b = image_pair
  got = np.asarray(im.ssim(a, b))
  np.testing.assert_allclose(got, _ssim_reference((a + 1) / 2, (b + 1) / 2, data_range=1.0), atol=2e-5)
  a255, b255 = (a + 1) * 127.5, (b + 1) * 127.5
  np.testing.assert_allclose(im.ssim(a255, b255, value_range=(0, 255)), _ssim_reference(a255, b255, 255.0), atol=2e-5)
  assert got[0] > got[1] > got[2]  # more noise, less similarity
  np.testing.assert_allclose(im.ssim(a, a), 1.0, atol=1e-5)


def test_metric_input_errors(image_pair):
  a, b = image_pair
  with pytest.raises(ValueError, match="differ in shape"):
    im.psnr(a, b[:, :-1])
  with pytest.raises(ValueError, match="at least 11x11"):
    im.ssim(a[:, :8, :8], b[:, :8, :8])
  with pytest.raises(ValueError, match="value_range"):
    im.psnr(a, b, value_range=(1.0, 1.0))
