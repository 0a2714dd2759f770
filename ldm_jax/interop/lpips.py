"""LPIPS weights: converting the published PyTorch files once, and reading the converted file.

    python -m ldm_jax.interop.lpips --vgg vgg16-397923af.pth --lin vgg.pth --out lpips_vgg.npz

(torchvision's ImageNet VGG16 and lpips' ``weights/v0.1/vgg.pth``; the
network is ``ldm_jax.models.lpips``).
"""

import argparse
import os

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ldm_jax.interop.naming import torch_to_flax
from ldm_jax.interop.weights import StateDictSource, read_state_dict
from ldm_jax.models.lpips import VGG16_SLICES, Params, lpips_template
from ldm_jax.training.variables_file import load_variables, save_variables

CONVERT_COMMAND = "python -m ldm_jax.interop.lpips --vgg VGG16.pth --lin LPIPS_VGG.pth --out {out}"


def convert_lpips_weights(vgg_state_dict: StateDictSource, lin_state_dict: StateDictSource) -> Params:
  """torchvision VGG16 + lpips ``vgg.pth`` state dicts (paths or dicts) -> LPIPS params.

  Uses ``features.{0..28}.weight/bias`` of the first (the classifier is
  ignored) and ``lin{0..4}.model.1.weight`` of the second; anything missing
  or mis-shaped is reported at once.
  """
  vgg = {k: v for k, v in read_state_dict(vgg_state_dict).items() if k.startswith("features.")}
  lin = {k: v for k, v in read_state_dict(lin_state_dict).items() if k.startswith("lin")}
  params = torch_to_flax({**vgg, **lin}, {"params": lpips_template()}, what="LPIPS weights")["params"]
  for k in range(len(VGG16_SLICES)):
    if np.any(params[f"lin{k}"]["model_1"]["kernel"] < 0):
      raise ValueError(f"lin{k}.model.1.weight has negative entries: not an LPIPS head (they are clamped >= 0)")
  return params


def save_lpips_params(params: Params, path: str | os.PathLike) -> None:
  """Writes params to ``.npz`` or ``.safetensors`` (keys ``features_0/kernel``, ...)."""
  save_variables(os.fspath(path), traverse_util.unflatten_dict(
      {k: np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(params).items()}))


def load_lpips_params(path: str | os.PathLike | None) -> Params:
  """Reads params written by :func:`save_lpips_params`, checking every name and shape."""
  if path is None or not os.path.isfile(os.fspath(path)):
    raise FileNotFoundError(
        f"LPIPS weights not found at {path!r}. The perceptual loss (perceptual_weight > 0) needs "
        "torchvision's VGG16 and lpips' vgg.pth converted once with:\n  "
        + CONVERT_COMMAND.format(out=path or "lpips_vgg.npz")
        + "\nor set perceptual_weight=0."
    )
  flat = traverse_util.flatten_dict(load_variables(os.fspath(path), what="LPIPS weights"), sep="/")
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
