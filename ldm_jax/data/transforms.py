"""Per-example geometry: resize, crop, flip; and the [-1, 1] scaling.

Image, segmentation map and boxes move together, so they keep agreeing
after any transform. Random choices come from the ``rng`` the pipeline
derives from (seed, example position): the same example gets the same crop
whatever the number of workers.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

CROPS = ("center", "random")


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Resize shorter side to ``image_size`` (antialiased), crop a square, maybe flip."""

  image_size: int
  crop: str = "center"
  random_flip: bool = False

  def __post_init__(self):
    if self.crop not in CROPS:
      raise ValueError(f"Unknown crop {self.crop!r}; expected one of {CROPS}.")

  def __call__(self, example: dict, rng: np.random.Generator) -> dict:
    """Transforms ``image`` (H, W, 3) uint8 and, when present,
    ``segmentation`` (H, W) and ``boxes`` (N, 4) normalised (ymin, xmin, ymax, xmax)
    of which the first ``num_objects`` are real."""
    out = dict(example)
    height, width = example["image"].shape[:2]
    scale = self.image_size / min(height, width)
    new_h = max(self.image_size, round(height * scale))
    new_w = max(self.image_size, round(width * scale))
    if self.crop == "random":
      top = int(rng.integers(0, new_h - self.image_size + 1))
      left = int(rng.integers(0, new_w - self.image_size + 1))
    else:
      top, left = (new_h - self.image_size) // 2, (new_w - self.image_size) // 2
    flip = self.random_flip and bool(rng.random() < 0.5)
    window = (slice(top, top + self.image_size), slice(left, left + self.image_size))

    out["image"] = _resize(example["image"], new_h, new_w, Image.Resampling.BICUBIC)[window]
    if "segmentation" in example:
      # Nearest neighbour: class ids must not be blended.
      out["segmentation"] = _resize(example["segmentation"], new_h, new_w, Image.Resampling.NEAREST)[window]
    if "boxes" in example:
      num_real = example.get("num_objects", len(example["boxes"]))
      out["boxes"] = self._move_boxes(example["boxes"], num_real, (new_h, new_w), (top, left), flip)
    if flip:
      out["image"] = out["image"][:, ::-1]
      if "segmentation" in out:
        out["segmentation"] = out["segmentation"][:, ::-1]
    if "original_size" in example:
      # SDXL's crop conditioning: the crop's top-left in the resized image, as seen after any flip.
      out["crop_coords"] = np.asarray([top, new_w - self.image_size - left if flip else left], np.int32)
    for key in ("image", "segmentation"):
      if key in out:
        out[key] = np.ascontiguousarray(out[key])
    return out

  def _move_boxes(self, boxes, num_objects, resized_hw, offset_yx, flip) -> np.ndarray:
    boxes = np.array(boxes, np.float32)
    real = boxes[:num_objects]
    size = np.asarray(resized_hw * 2, np.float32)  # (h, w, h, w)
    offset = np.asarray(offset_yx * 2, np.float32)
    real = np.clip((real * size - offset) / self.image_size, 0.0, 1.0)
    if flip:
      real = np.stack([real[:, 0], 1.0 - real[:, 3], real[:, 2], 1.0 - real[:, 1]], axis=1)
    boxes[:num_objects] = real
    return boxes


def _resize(array: np.ndarray, height: int, width: int, resample: Image.Resampling) -> np.ndarray:
  if array.shape[:2] == (height, width):
    return array
  # Pillow's resize filters scale their support when shrinking: antialiased.
  return np.asarray(Image.fromarray(array).resize((width, height), resample=resample))


def to_unit_range(images_uint8: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return images_uint8.astype(np.float32) / 127.5 - 1.0
