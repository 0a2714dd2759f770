"""``reconstruct.py``: encode and decode a folder of images with a trained
first stage, writing the reconstructions and their PSNR."""

import json
import os

import jax
import numpy as np

from ldm_jax.data.config import validate_image_size
from ldm_jax.data.folder_source import list_images
from ldm_jax.data.image_io import save_png, to_uint8
from ldm_jax.data.images import decode_image
from ldm_jax.data.transforms import Geometry, to_unit_range
from ldm_jax.evaluation.image_metrics import psnr
from ldm_jax.interop.load import load_first_stage
from ldm_jax.training.reconstruction import make_reconstruct_fn


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
