"""Conditioning files of ``sample.py``: images, label maps and layouts, read with one-line errors.

Every failure is a ``ValueError`` that names the flag, the file and the problem.
Conventions:

- images (``--init_image``, ``--low_res``): any format PIL reads, as RGB, mapped to [-1, 1];
- masks (``--mask``): grey levels, **white (> 127) = hole** (repainted), black = kept;
- label maps (``--segmentation``): a one-channel PNG (mode ``L``, ``P``, ``I`` or ``I;16``)
  whose pixel values are class indices, used exactly (never resized or interpolated);
- layouts (``--layout``): JSON ``{"boxes": [[x0, y0, x1, y1], ...], "labels": [...]}``, boxes
  as fractions of the image in [0, 1] with ``x0 <= x1``, ``y0 <= y1``; one integer label per box.
"""

import json
import math
import os

import numpy as np
from PIL import Image

# PIL modes whose pixels are integers of one channel (palette images give their indices).
LABEL_MODES = ("L", "P", "I", "I;16")


def _open(path: str, flag: str) -> Image.Image:
  if not os.path.isfile(path):
    raise ValueError(f"{flag} {path!r} does not exist")
  try:
    image = Image.open(path)
    image.load()
  except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
    raise ValueError(f"{flag} {path!r} is not an image PIL can read ({e})") from None
  return image


def image_size(path: str, flag: str) -> tuple[int, int]:
  """(width, height) of an image file."""
  with _open(path, flag) as image:
    return image.size


def read_rgb(path: str, flag: str) -> np.ndarray:
  """(H, W, 3) float32 in [-1, 1]."""
  with _open(path, flag) as image:
    return np.asarray(image.convert("RGB"), np.float32) / 127.5 - 1.0


def read_mask(path: str, flag: str = "--mask") -> np.ndarray:
  """(H, W) float32: 1 where the image is white (> 127, the hole), 0 elsewhere."""
  with _open(path, flag) as image:
    return (np.asarray(image.convert("L")) > 127).astype(np.float32)


def read_label_map(path: str, flag: str = "--segmentation") -> np.ndarray:
  """(H, W) int32 class indices from a one-channel PNG."""
  with _open(path, flag) as image:
    if image.mode not in LABEL_MODES:
      raise ValueError(f"{flag} {path!r} is a {image.mode} image; a label map is one channel of integer class "
                       f"indices (PIL mode {', '.join(LABEL_MODES)})")
    return np.asarray(image).astype(np.int32)


def read_layout(path: str, flag: str = "--layout") -> tuple[np.ndarray, np.ndarray]:
  """``(boxes (O, 4) as (x0, y0, x1, y1), labels (O,))`` of a layout JSON file."""
  if not os.path.isfile(path):
    raise ValueError(f"{flag} {path!r} does not exist")
  try:
    with open(path) as f:
      layout = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{flag} {path!r} is not valid JSON ({e})") from None
  if not isinstance(layout, dict) or not {"boxes", "labels"} <= set(layout):
    raise ValueError(f'{flag} {path!r} must hold an object {{"boxes": [[x0, y0, x1, y1], ...], "labels": [...]}}')
  boxes, labels = layout["boxes"], layout["labels"]
  if not isinstance(boxes, list) or not isinstance(labels, list) or len(boxes) != len(labels):
    raise ValueError(f"{flag} {path!r}: boxes and labels must be lists of one length, got "
                     f"{_count(boxes)} boxes and {_count(labels)} labels")
  for i, box in enumerate(boxes):
    if (not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box)
        or not all(0.0 <= v <= 1.0 for v in box) or box[0] > box[2] or box[1] > box[3]):
      raise ValueError(f"{flag} {path!r}: box {i} is {box!r}; boxes are [x0, y0, x1, y1] fractions of the image in "
                       "[0, 1] with x0 <= x1 and y0 <= y1")
  for i, label in enumerate(labels):
    if not isinstance(label, int) or isinstance(label, bool):
      raise ValueError(f"{flag} {path!r}: label {i} is {label!r}, not an integer class index")
  return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int32)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _count(value) -> str:
  return str(len(value)) if isinstance(value, list) else f"not a list ({type(value).__name__})"
