"""LPIPS against an independent float64 NumPy computation, and its weight files."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from ldm_jax.interop import lpips as lpips_io
from ldm_jax.interop.naming import StateDictMismatchError
from ldm_jax.models import lpips

CONV_CHANNELS = {0: 64, 2: 64, 5: 128, 7: 128, 10: 256, 12: 256, 14: 256,
                 17: 512, 19: 512, 21: 512, 24: 512, 26: 512, 28: 512}


@pytest.fixture(scope="module")
def state_dicts():
  """Random torchvision-vgg16 and lpips-head state dicts (PyTorch layouts)."""
  rng = np.random.default_rng(0)
  vgg, c_in = {}, 3
  for i, c_out in CONV_CHANNELS.items():
    he_std = np.sqrt(2 / (9 * c_in))  # keeps activations O(1) through 13 layers
    vgg[f"features.{i}.weight"] = rng.normal(scale=he_std, size=(c_out, c_in, 3, 3)).astype(np.float32)
    vgg[f"features.{i}.bias"] = rng.normal(scale=0.05, size=(c_out,)).astype(np.float32)
    c_in = c_out
  vgg["classifier.0.weight"] = rng.normal(size=(4, 8)).astype(np.float32)  # present in the real file, unused
  lin = {f"lin{k}.model.1.weight": np.abs(rng.normal(size=(1, c, 1, 1))).astype(np.float32)
         for k, c in enumerate(lpips.VGG16_CHANNELS)}
  return vgg, lin


@pytest.fixture(scope="module")
def params(state_dicts):
  return lpips_io.convert_lpips_weights(*state_dicts)


def reference_lpips(x, y, vgg, lin):
  """taming's LPIPS, written out in float64 NumPy on NHWC arrays."""

  def conv3x3(h, w, b):
    windows = sliding_window_view(np.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0))), (3, 3), axis=(1, 2))
    return np.einsum("nhwcij,ocij->nhwo", windows, w.astype(np.float64), optimize=True) + b

  def features(img):
    h = (img - np.array(lpips.SHIFT)) / np.array(lpips.SCALE)
    outs = []
    for k, indices in enumerate(lpips.VGG16_SLICES):
      if k:
        n, hh, ww, c = h.shape
        h = h.reshape(n, hh // 2, 2, ww // 2, 2, c).max(axis=(2, 4))
      for i in indices:
        h = np.maximum(conv3x3(h, vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"]), 0)
      outs.append(h)
    return outs

  total = 0
  for k, (f0, f1) in enumerate(zip(features(x.astype(np.float64)), features(y.astype(np.float64)))):
    f0 = f0 / (np.sqrt((f0**2).sum(-1, keepdims=True)) + 1e-10)
    f1 = f1 / (np.sqrt((f1**2).sum(-1, keepdims=True)) + 1e-10)
    weighted = ((f0 - f1) ** 2) @ lin[f"lin{k}.model.1.weight"].reshape(-1).astype(np.float64)
    total = total + weighted.mean(axis=(1, 2))
  return total


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(1)
  x = rng.uniform(-1, 1, (2, 32, 48, 3)).astype(np.float32)
  y = np.clip(x + rng.normal(scale=0.3, size=x.shape), -1, 1).astype(np.float32)
  return x, y


@pytest.fixture(scope="module")
def lpips_values_and_grads(params, images):
  """LPIPS per image, and gradients to the weights and to the second image (one compile)."""
  x, y = images

  def total(p, y):
    values = lpips.make_lpips_fn(p)(x, y)
    return jnp.sum(values), values

  (_, values), grads = jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True))(params, y)
  return values, grads


def test_matches_float64_reference(state_dicts, images, lpips_values_and_grads):
  x, y = images
  ours, _ = lpips_values_and_grads
  expected = reference_lpips(x, y, *state_dicts)
  assert ours.shape == (2,) and np.all(expected > 0)
  np.testing.assert_allclose(ours, expected, rtol=2e-5)


def test_weights_are_frozen_and_inputs_get_gradients(lpips_values_and_grads):
  _, (grad_params, grad_y) = lpips_values_and_grads
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grad_params))
  assert np.all(np.isfinite(grad_y)) and np.abs(grad_y).max() > 0


def test_converter_reads_torch_files(tmp_path, state_dicts, params):
  torch = pytest.importorskip("torch")
  vgg, lin = state_dicts
  torch.save({k: torch.from_numpy(v) for k, v in vgg.items()}, tmp_path / "vgg16.pth")
  torch.save({k: torch.from_numpy(v) for k, v in lin.items()}, tmp_path / "vgg.pth")
  converted = lpips_io.convert_lpips_weights(tmp_path / "vgg16.pth", tmp_path / "vgg.pth")
  jax.tree.map(np.testing.assert_array_equal, converted, params)
  np.testing.assert_array_equal(  # OIHW -> HWIO
      params["features_5"]["kernel"], vgg["features.5.weight"].transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(params["lin2"]["model_1"]["kernel"][0, 0, :, 0], lin["lin2.model.1.weight"][0, :, 0, 0])


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_converter_and_params_files_round_trip(tmp_path, state_dicts, params, suffix):
  vgg, lin = state_dicts
  if suffix == ".npz":
    np.savez(tmp_path / f"vgg{suffix}", **vgg)
    np.savez(tmp_path / f"lin{suffix}", **lin)
  else:
    from safetensors.numpy import save_file

    save_file(vgg, tmp_path / f"vgg{suffix}")
    save_file(lin, tmp_path / f"lin{suffix}")
  out = tmp_path / f"lpips{suffix}"
  lpips_io.main(["--vgg", str(tmp_path / f"vgg{suffix}"), "--lin", str(tmp_path / f"lin{suffix}"), "--out", str(out)])
  jax.tree.map(np.testing.assert_array_equal, lpips_io.load_lpips_params(out), params)


def test_missing_and_bad_files_are_explained(tmp_path, state_dicts, params):
  vgg, lin = state_dicts
  with pytest.raises(ValueError, match="at least 16x16"):
    lpips.LPIPS().apply({"params": params}, np.zeros((1, 8, 32, 3)), np.zeros((1, 8, 32, 3)))
  with pytest.raises(FileNotFoundError, match="python -m ldm_jax.interop.lpips --vgg"):
    lpips_io.load_lpips_params(tmp_path / "absent.npz")
  np.savez(tmp_path / "partial.npz", **{"features_0/kernel": np.zeros((3, 3, 3, 64), np.float32)})
  with pytest.raises(ValueError, match="missing.*features_0/bias"):
    lpips_io.load_lpips_params(tmp_path / "partial.npz")
  with pytest.raises(StateDictMismatchError, match="features/28/kernel|features_28/kernel"):
    lpips_io.convert_lpips_weights({k: v for k, v in vgg.items() if "28" not in k}, lin)
  negative = dict(lin, **{"lin0.model.1.weight": -lin["lin0.model.1.weight"]})
  with pytest.raises(ValueError, match="lin0.*negative"):
    lpips_io.convert_lpips_weights(vgg, negative)
