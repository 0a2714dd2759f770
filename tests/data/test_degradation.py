"""Host-side low-res inputs: the LDM-BSR degradation and its pieces against closed forms, bicubic against Pillow."""

import numpy as np
import pytest
from PIL import Image

from ldm_jax.data import degradation as deg


def _smooth_image(rng, size=32):
  """A uint8 image with structure at several scales (random low-frequency waves plus texture)."""
  y, x = np.mgrid[0:size, 0:size] / size
  waves = sum(np.sin(2 * np.pi * (rng.uniform(0.5, 3) * x + rng.uniform(0.5, 3) * y) + rng.uniform(0, 6))[..., None]
              * rng.uniform(0.1, 0.3, 3) for _ in range(4))
  image = 0.5 + waves + 0.05 * rng.standard_normal((size, size, 3))
  return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("factor", [2, 4])
def test_bsr_output_is_the_low_res_size_in_range_and_a_function_of_the_seed(factor):
  image = _smooth_image(np.random.default_rng(0), 96)  # at 32 px the blur alone erases most of a picture
  transform = deg.LowRes("bsr", factor)
  outs = [transform(image, np.random.default_rng([3, i])) for i in range(12)]
  bicubic = deg.LowRes("bicubic", factor)(image, None)
  for out in outs:
    assert out.shape == (96 // factor, 96 // factor, 3) and out.dtype == np.float32
    assert out.min() >= -1 and out.max() <= 1
    levels = (out + 1) * 127.5  # a uint8 image scaled to [-1, 1]
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
    # Degraded, but still the same picture as the plain bicubic downsampling.
    assert np.corrcoef(out.ravel(), bicubic.ravel())[0, 1] > 0.7
  np.testing.assert_array_equal(outs[0], transform(image, np.random.default_rng([3, 0])))
  assert len({out.tobytes() for out in outs}) == len(outs)


def test_bsr_refuses_sizes_the_factor_does_not_divide():
  with pytest.raises(ValueError, match="30x30 is not divisible by the low-res factor 4"):
    deg.bsr_degrade(np.zeros((30, 30, 3), np.uint8), 4, np.random.default_rng(0))
  with pytest.raises(ValueError, match="low_res_factor must be a positive integer"):
    deg.LowRes("bsr", 0)
  with pytest.raises(ValueError, match="one of"):
    deg.LowRes("device_bicubic", 4)


def test_gaussian_kernels_have_the_requested_covariance():
  def moments(k):
    y, x = np.mgrid[0:k.shape[0], 0:k.shape[1]]
    mean = np.array([(k * x).sum(), (k * y).sum()])
    d = np.stack([x - mean[0], y - mean[1]], -1)
    return mean, np.einsum("hw,hwi,hwj->ij", k, d, d)

  k = deg.isotropic_gaussian_kernel(25, 2.0)
  mean, cov = moments(k)
  np.testing.assert_allclose(k.sum(), 1.0, rtol=1e-12)
  np.testing.assert_allclose(mean, [12, 12], atol=1e-12)
  np.testing.assert_allclose(cov, 4.0 * np.eye(2), atol=1e-4)
  theta, v1, v2 = 0.6, 3.0, 0.8
  rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
  mean, cov = moments(deg.anisotropic_gaussian_kernel(24, theta, v1, v2))  # even size: centred between pixels
  np.testing.assert_allclose(mean, [11.5, 11.5], atol=1e-12)
  np.testing.assert_allclose(cov, rot @ np.diag([v1, v2]) @ rot.T, atol=2e-3)
  # A (near) zero variance is a delta, not NaN.
  np.testing.assert_allclose(deg.isotropic_gaussian_kernel(5, 0.0)[2, 2], 1.0)


@pytest.mark.parametrize("omega", [(np.pi / 4, 0.0), (np.pi / 2, np.pi / 3), (2 * np.pi / 3, -np.pi / 5)])
def test_blur_damps_each_frequency_as_the_gaussian_transfer_function_says(omega):
  """A plane wave cos(w.x) comes out multiplied by the kernel's transfer function at w: exactly its DTFT,
  and nearly the continuous Gaussian's exp(-w^T S w / 2)."""
  size = 64
  y, x = np.mgrid[0:size, 0:size].astype(np.float64)
  wave = np.cos(omega[0] * x + omega[1] * y)
  image = np.stack([wave, 0.5 * wave, -wave], -1)
  theta, v1, v2 = 0.4, 2.0, 0.7
  rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
  cov = rot @ np.diag([v1, v2]) @ rot.T
  kernel = deg.anisotropic_gaussian_kernel(21, theta, v1, v2)
  out = deg.blur(image, kernel)
  ky, kx = np.mgrid[-10:11, -10:11]
  gain = (kernel * np.cos(omega[0] * kx + omega[1] * ky)).sum()
  w = np.asarray(omega)
  np.testing.assert_allclose(gain, np.exp(-0.5 * w @ cov @ w), atol=1e-3)
  inner = (slice(12, -12), slice(12, -12))  # away from the mirrored borders
  np.testing.assert_allclose(out[inner], gain * image[inner], atol=1e-9)


def test_blur_reduces_white_noise_energy_by_the_kernels_squared_norm():
  rng = np.random.default_rng(0)
  noise = rng.standard_normal((160, 160, 1))
  for kernel in (deg.isotropic_gaussian_kernel(7, 1.2), deg.anisotropic_gaussian_kernel(13, 1.0, 3.0, 0.5)):
    out = deg.blur(noise, kernel)[10:-10, 10:-10]
    np.testing.assert_allclose(out.var(), (kernel**2).sum(), rtol=0.08)


def test_resize_weights_match_closed_forms():
  rng = np.random.default_rng(0)
  image = rng.random((12, 16, 3)).astype(np.float32)
  blocks = image.reshape(3, 4, 4, 4, 3).mean(axis=(1, 3))
  np.testing.assert_allclose(deg.resize(image, 3, 4, "area"), blocks, atol=1e-6)
  pairs = image.reshape(6, 2, 8, 2, 3).mean(axis=(1, 3))  # linear at factor 2 reads between two pixels
  np.testing.assert_allclose(deg.resize(image, 6, 8, "linear"), pairs, atol=1e-6)
  # OpenCV's cubic (A = -0.75) at factor 2 reads 4 pixels around 2i + 0.5 with weights from the kernel
  # at distances 1.5, 0.5, 0.5, 1.5: -0.09375, 0.59375, 0.59375, -0.09375.
  row = image[0, :, 0]
  expected = np.convolve(row, [-0.09375, 0.59375, 0.59375, -0.09375], "valid")[1::2]  # taps 2i-1 .. 2i+2
  np.testing.assert_allclose(deg.resize(image[:1, :, :1], 1, 8, "cubic")[0, 1:-1, 0], expected[:6], atol=1e-6)
  for method in deg.INTERPOLATIONS:  # rows of weights sum to 1, up- and downsampling
    for n_in, n_out in ((13, 5), (5, 13)):
      np.testing.assert_allclose(deg.resize_weights(n_in, n_out, method).sum(1), 1.0, atol=1e-12)


def test_noise_std_lies_in_the_configured_range_on_a_flat_image():
  flat = np.full((256, 256, 3), 0.5, np.float32)
  stds, grey, colour = [], 0, 0
  for seed in range(30):
    noisy = deg.add_gaussian_noise(flat, np.random.default_rng(seed), 2, 25) - flat
    std = noisy.std(axis=(0, 1)) * 255
    stds.append(std)
    assert np.all(std <= 25 * 1.03)  # correlated noise (20%) has channels at or below the top level
    corr = np.corrcoef(noisy.reshape(-1, 3).T)
    grey_case, colour_case = np.allclose(corr, 1.0), np.all(np.abs(corr[np.triu_indices(3, 1)]) < 0.02)
    grey, colour = grey + grey_case, colour + colour_case
    if grey_case or colour_case:  # one level for all channels, an integer in [2, 25]
      assert np.ptp(std) < 0.3 and abs(std.mean() - round(std.mean())) < 0.2 and 2 <= round(std.mean()) <= 25
  assert grey > 3 and colour > 3
  assert np.ptp(np.mean(stds, axis=1)) > 10  # levels vary from record to record
  light = [deg.add_gaussian_noise(flat, np.random.default_rng(s)).std() * 255 for s in range(10)]
  assert max(light) <= deg.NOISE_LEVELS[1] * 1.03


def test_jpeg_error_grows_as_quality_falls():
  rng = np.random.default_rng(1)
  # Texture in the luminance only: 4:2:0 chroma subsampling erases colour noise at any quality.
  y, x = np.mgrid[0:64, 0:64] / 64
  colour = np.stack([np.sin(2 * np.pi * x), np.cos(2 * np.pi * y), np.sin(2 * np.pi * (x + y))], -1)
  image = np.clip(0.5 + 0.3 * colour + 0.05 * rng.standard_normal((64, 64, 1)), 0, 1)
  errors = [np.abs(deg.jpeg_compress(image, q) - image).mean() for q in (10, 40, 80, 95)]
  assert errors == sorted(errors, reverse=True) and errors[0] > 2 * errors[-1]
  assert errors[-1] < 3 / 255
  assert deg.JPEG_QUALITY == (80, 95)


def _pil_bicubic_float64(image, factor):
  """Pillow's antialiased bicubic in float64: a = -0.5, support stretched by the factor, renormalised."""
  def weights(n_in):
    n_out = n_in // factor
    w = np.zeros((n_out, n_in))
    for j in range(n_out):
      centre = (j + 0.5) * factor
      t = (np.arange(n_in) + 0.5 - centre) / factor
      a, at = -0.5, np.abs(t)
      far = np.where(at < 2, a * (at**3 - 5 * at**2 + 8 * at - 4), 0)
      w[j] = np.where(at < 1, ((a + 2) * at - (a + 3)) * at**2 + 1, far)
      w[j] /= w[j].sum()
    return w

  wy, wx = weights(image.shape[0]), weights(image.shape[1])
  return np.einsum("ah,hwc,bw->abc", wy, image.astype(np.float64), wx)


def test_bicubic_is_pillows_antialiased_bicubic():
  image = _smooth_image(np.random.default_rng(2), 32)
  out = deg.LowRes("bicubic", 4)(image, None)
  pil = np.asarray(Image.fromarray(image).resize((8, 8), Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(out, pil.astype(np.float32) / 127.5 - 1)
  # The closed form (uint8 rounding between Pillow's two passes: 1-2 levels).
  np.testing.assert_allclose((out + 1) * 127.5, np.clip(_pil_bicubic_float64(image, 4), 0, 255), atol=2.0)
  # Antialiased: far from the plain (aliasing) cubic resize on a noise image.
  noise = np.random.default_rng(3).integers(0, 256, (32, 32, 3)).astype(np.uint8)
  plain = deg.resize(noise.astype(np.float32), 8, 8, "cubic")
  anti = deg.bicubic_downsample(noise, 4).astype(np.float32)
  assert anti.std() < 0.5 * plain.std()
