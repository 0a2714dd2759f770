"""LPIPS perceptual distance (VGG16 variant, as in taming / richzhang's lpips).

VGG16 features at relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 of both
images (inputs in [-1, 1], shifted and scaled by the reference
ScalingLayer), unit-normalised over channels, squared differences weighted
by the non-negative 1x1 ``lin`` heads, averaged over space and summed over
the five layers: one distance per image.

The network is frozen. Its weights come from two published PyTorch files,
converted once into our format:

    python -m ldm_jax.models.lpips --vgg vgg16-397923af.pth --lin vgg.pth --out lpips_vgg.npz

(torchvision's ImageNet VGG16 and lpips' ``weights/v0.1/vgg.pth``). Params
mirror their names: ``features_{i}/kernel`` for ``features.{i}.weight``,
``lin{k}/model_1/kernel`` for ``lin{k}.model.1.weight``.
"""

import argparse
import os
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ldm_jax.interop.naming import torch_to_flax

Dtype = Any
Params = dict[str, Any]

# torchvision vgg16.features conv indices, grouped by the five LPIPS slices;
# a 2x2 max-pool precedes every slice but the first.
VGG16_SLICES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
VGG16_CHANNELS = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10
_CONVERT_COMMAND = "python -m ldm_jax.models.lpips --vgg VGG16.pth --lin LPIPS_VGG.pth --out {out}"


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


# ----------------------------------------------------------------- weight files


def _read_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, np.ndarray]:
  """A PyTorch-named state dict from a dict, .pth/.pt (torch, weights_only),
  .safetensors or .npz file."""
  if isinstance(source, Mapping):
    return {k: _to_numpy(v) for k, v in source.items()}
  path = os.fspath(source)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"LPIPS converter: no file at {path!r}")
  if path.endswith((".pth", ".pt", ".bin", ".ckpt")):
    try:
      import torch
    except ImportError as e:
      raise ImportError(f"reading {path!r} needs torch (pip install torch), or pass a .safetensors/.npz file") from e
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return {k: _to_numpy(v) for k, v in sd.get("state_dict", sd).items()}
  return _read_flat_arrays(path)


def _to_numpy(value: Any) -> np.ndarray:
  return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


def _read_flat_arrays(path: str) -> dict[str, np.ndarray]:
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file

    return load_file(path)
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  raise ValueError(f"unsupported weight file {path!r}: use .pth/.pt (needs torch), .safetensors or .npz")


def convert_lpips_weights(
    vgg_state_dict: str | os.PathLike | Mapping[str, Any],
    lin_state_dict: str | os.PathLike | Mapping[str, Any],
) -> Params:
  """torchvision VGG16 + lpips ``vgg.pth`` state dicts (paths or dicts) → LPIPS params.

  Uses ``features.{0..28}.weight/bias`` of the first (the classifier is
  ignored) and ``lin{0..4}.model.1.weight`` of the second; anything missing
  or mis-shaped is reported at once.
  """
  vgg = {k: v for k, v in _read_state_dict(vgg_state_dict).items() if k.startswith("features.")}
  lin = {k: v for k, v in _read_state_dict(lin_state_dict).items() if k.startswith("lin")}
  params = torch_to_flax({**vgg, **lin}, {"params": lpips_template()}, what="LPIPS weights")["params"]
  for k in range(len(VGG16_SLICES)):
    if np.any(params[f"lin{k}"]["model_1"]["kernel"] < 0):
      raise ValueError(f"lin{k}.model.1.weight has negative entries: not an LPIPS head (they are clamped >= 0)")
  return params


def save_lpips_params(params: Params, path: str | os.PathLike) -> None:
  """Writes params to ``.npz`` or ``.safetensors`` (keys ``features_0/kernel``, ...)."""
  path = os.fspath(path)
  # Contiguous copies: safetensors writes raw buffers (converted kernels are transposed views).
  flat = {k: np.ascontiguousarray(v, np.float32) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  if path.endswith(".safetensors"):
    from safetensors.numpy import save_file

    save_file(flat, path)
  elif path.endswith(".npz"):
    np.savez(path, **flat)
  else:
    raise ValueError(f"LPIPS params are saved as .npz or .safetensors, got {path!r}")


def load_lpips_params(path: str | os.PathLike | None) -> Params:
  """Reads params written by :func:`save_lpips_params`, checking every name and shape."""
  if path is None or not os.path.isfile(os.fspath(path)):
    raise FileNotFoundError(
        f"LPIPS weights not found at {path!r}. The perceptual loss (perceptual_weight > 0) needs "
        "torchvision's VGG16 and lpips' vgg.pth converted once with:\n  "
        + _CONVERT_COMMAND.format(out=path or "lpips_vgg.npz")
        + "\nor set perceptual_weight=0."
    )
  flat = _read_flat_arrays(os.fspath(path))
  template = traverse_util.flatten_dict(lpips_template(), sep="/")
  missing = sorted(set(template) - set(flat))
  unexpected = sorted(set(flat) - set(template))
  bad = [
      f"{k}: file {flat[k].shape} vs model {template[k].shape}"
      for k in template
      if k in flat and flat[k].shape != template[k].shape
  ]
  if missing or unexpected or bad:
    raise ValueError(f"{path} is not an LPIPS params file: missing {missing}, unexpected {unexpected}, shapes {bad}")
  return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep="/")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description="Convert LPIPS (VGG16) PyTorch weights to ldm_jax params.")
  parser.add_argument("--vgg", required=True, help="torchvision vgg16 state dict (vgg16-397923af.pth)")
  parser.add_argument("--lin", required=True, help="lpips linear heads (lpips/weights/v0.1/vgg.pth)")
  parser.add_argument("--out", required=True, help="output .npz or .safetensors")
  args = parser.parse_args(argv)
  save_lpips_params(convert_lpips_weights(args.vgg, args.lin), args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
