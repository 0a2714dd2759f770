"""One example from source format to model-ready (still uint8) arrays.

Runs inside grain's ``random_map`` (possibly in worker processes), so it is
a picklable callable and never raises on bad data: an example that cannot
be decoded comes out as an error record, which the batcher counts and skips.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ldm_jax.data.images import decode_image
from ldm_jax.data.skipping import ERROR_KEY, MISSING_CAPTION_KEY, error_record
from ldm_jax.data.transforms import Geometry

_INT_FIELDS = ("label", "num_objects", "box_labels")


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Decode the image, pick a caption (``missing_caption``: "empty" or "skip"), apply the geometry."""

  geometry: Geometry
  missing_caption: str = "empty"

  def __call__(self, example: dict, rng: np.random.Generator) -> dict:
    if ERROR_KEY in example:
      return example
    where = example.get("path", "an example")
    if example.get("caption", "") is None and self.missing_caption == "skip":  # before decoding: cheaper
      return {**error_record(f"{where}: no caption file (data.missing_caption='skip')"), MISSING_CAPTION_KEY: where}
    try:
      out = {"image": decode_image(example["image"])}
    except Exception as error:  # Unreadable image: skip, never crash.
      return error_record(f"{where}: {error}")
    if "caption" in example:
      caption = example["caption"]
      if caption is None:
        caption, out[MISSING_CAPTION_KEY] = "", where
      # Datasets with several captions per image (COCO) get a random one.
      out["caption"] = caption[rng.integers(len(caption))] if isinstance(caption, list) else caption
    for key in _INT_FIELDS:
      if key in example:
        out[key] = np.asarray(example[key], np.int32)
    for key in ("segmentation", "boxes"):
      if key in example:
        out[key] = np.asarray(example[key])
    return self.geometry(out, rng)
