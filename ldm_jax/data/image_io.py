"""Images out: [-1, 1] floats to uint8, grids, and PNG files with their
settings in the metadata."""

import json
import os

import numpy as np
from PIL import Image, PngImagePlugin


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] float images → uint8."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images_NxHxWx3: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
  """uint8 images → one uint8 grid image, ``ncols`` per row (default: square-ish)."""
  images = np.asarray(images_NxHxWx3)
  n, h, w, c = images.shape
  ncols = ncols or int(np.ceil(np.sqrt(n)))
  nrows = int(np.ceil(n / ncols))
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, ncols)
    grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = image
  return grid


def save_png(path: str, image_HxWx3: np.ndarray, metadata: dict | None = None) -> str:
  """Writes a PNG; ``metadata`` goes into a ``parameters`` text chunk as JSON."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  info = None
  if metadata:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", json.dumps(metadata, sort_keys=True, default=str))
  Image.fromarray(np.asarray(image_HxWx3, np.uint8)).save(path, pnginfo=info)
  return path
