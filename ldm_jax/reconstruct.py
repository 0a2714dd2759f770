"""Encoding and decoding images with a trained first stage.

:func:`make_reconstruct_fn` is the one compiled program that both the
stage-1 trainer (validation PSNR/LPIPS, reconstruction grids, the latent
scale factor) and the ``reconstruct.py`` command use;
:func:`reconstruct_folder` is that command's library side.
"""

import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.data.config import validate_image_size
from ldm_jax.data.folder_source import list_images
from ldm_jax.data.images import decode_image
from ldm_jax.data.transforms import Geometry, to_unit_range
from ldm_jax.evaluation.image_metrics import psnr
from ldm_jax.image_grid import save_png
from ldm_jax.models.autoencoder import AutoencoderKL, DiagonalGaussian
from ldm_jax.models.lpips import make_lpips_fn
from ldm_jax.models.vq import VQModel
from ldm_jax.pipeline import to_uint8

ReconstructFn = Callable[[Any, Any, jax.Array], dict[str, jax.Array]]


def make_reconstruct_fn(model: AutoencoderKL | VQModel) -> ReconstructFn:
  """Jitted ``fn(ae_params, lpips_params | None, images) -> dict`` of

  - ``reconstruction``: D(E(x)) clipped to [-1, 1] (the posterior mean for
    KL, the quantised latent for VQ);
  - ``latent_mean``, ``latent_var``: the posterior's moments (KL) or the
    pre-quantisation latent and zeros (VQ): what the LDM diffuses;
  - ``psnr`` (and ``lpips`` with LPIPS params): per image.
  """

  def fn(ae_params, lpips_params, x_BxHxWxC):
    variables = {"params": ae_params}
    latent = model.apply(variables, x_BxHxWxC, method=model.encode)
    if isinstance(latent, DiagonalGaussian):
      mean, var = latent.mean, latent.var
    else:
      mean, var = latent.astype(jnp.float32), jnp.zeros(latent.shape, jnp.float32)
    x_rec = jnp.clip(model.apply(variables, mean, method=model.decode).astype(jnp.float32), -1.0, 1.0)
    out = {"reconstruction": x_rec, "latent_mean": mean, "latent_var": var, "psnr": psnr(x_BxHxWxC, x_rec)}
    if lpips_params is not None:
      out["lpips"] = make_lpips_fn(lpips_params)(x_BxHxWxC, x_rec)
    return out

  return jax.jit(fn)


def latent_scale_factor(mean: np.ndarray, var: np.ndarray) -> float:
  """1 / std of latents z ~ N(mean, var) pooled over all elements (the
  reference's ``scale_by_std``), in float64.

  Var z = Var(mean) + E[var]: the expectation over the posterior noise,
  so the factor is the same on every run and process (the reference draws
  one sample; with ``var = 0``, as for VQ, both are 1 / std(mean)).
  """
  mean = np.asarray(mean, np.float64)
  variance = mean.var() + np.asarray(var, np.float64).mean()
  if not np.isfinite(variance) or variance <= 0:
    raise ValueError(f"latents have variance {variance}: cannot compute a scale factor")
  return float(1.0 / np.sqrt(variance))


def _output_names(relative_paths: list[str]) -> dict[str, str]:
  """``a/b.jpg`` → ``a/b.png``; two inputs that would share an output fail."""
  names, seen = {}, {}
  for rel in relative_paths:
    out = os.path.splitext(rel)[0] + ".png"
    if out in seen:
      raise ValueError(f"{rel!r} and {seen[out]!r} would both be written to {out!r}; rename one")
    names[rel], seen[out] = out, rel
  return names


def _read(path: str, geometry: Geometry) -> np.ndarray:
  """uint8 (size, size, 3): shorter side resized, centre-cropped."""
  with open(path, "rb") as f:
    image = decode_image(f.read())
  return geometry({"image": image}, np.random.default_rng(0))["image"]


def reconstruct_folder(
    checkpoint: str, input_dir: str, output_dir: str, *, size: int = 256, batch_size: int = 8
) -> dict:
  """Encodes and decodes every image under ``input_dir`` (recursively).

  Writes ``output_dir/<relative name>.png`` and ``output_dir/psnr.json``;
  returns that JSON's content: per-image PSNR (dB, of the written 8-bit
  reconstruction against the resized and cropped 8-bit input), their mean,
  and the unreadable files that were skipped, with the reason.
  """
  from ldm_jax.training.first_stage_io import load_first_stage

  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  model, variables, _, _ = load_first_stage(checkpoint)
  validate_image_size(size, model.downsample_factor)
  names = _output_names(list_images(input_dir))
  geometry = Geometry(size, "center")
  images, skipped = {}, []
  for rel in names:
    try:
      images[rel] = _read(os.path.join(input_dir, rel), geometry)
    except (ValueError, OSError) as error:  # UnreadableImageError is a ValueError
      skipped.append({"path": rel, "error": str(error)})
  if not images:
    raise ValueError(f"none of the {len(names)} images under {input_dir!r} could be read: {skipped}")

  fn = make_reconstruct_fn(model)
  rels = list(images)
  per_image = {}
  for start in range(0, len(rels), batch_size):
    chunk = rels[start: start + batch_size]
    batch = np.stack([images[r] for r in chunk])
    # Pad to a full batch: one compiled shape for every chunk.
    padded = np.concatenate([batch, np.repeat(batch[-1:], batch_size - len(chunk), axis=0)])
    recon = to_uint8(jax.device_get(fn(variables["params"], None, to_unit_range(padded))["reconstruction"]))
    scores = np.asarray(psnr(batch, recon[: len(chunk)], value_range=(0.0, 255.0)), np.float64)
    for rel, image, score in zip(chunk, recon, scores):
      save_png(os.path.join(output_dir, names[rel]), image)
      per_image[rel] = float(score)
  report = {
      "checkpoint": os.path.abspath(checkpoint),
      "size": size,
      "psnr": per_image,
      "mean_psnr": float(np.mean(list(per_image.values()))),
      "skipped": skipped,
  }
  with open(os.path.join(output_dir, "psnr.json"), "w") as f:
    json.dump(report, f, indent=2)
  return report
