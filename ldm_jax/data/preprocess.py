"""One example from source format to model-ready (still uint8) arrays.

Runs inside grain's ``random_map`` (possibly in worker processes), so it is
a picklable callable and never raises on bad data: an example that cannot
be decoded comes out as an error record, which the batcher counts and skips.

The conditional tasks' inputs are made here from the cropped image, after the
geometry: ``low_res`` (super-resolution), ``mask`` (inpainting); label maps
and layouts move with the image through the geometry.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ldm_jax.data.degradation import LowRes
from ldm_jax.data.folder_source import decode_label_map
from ldm_jax.data.images import decode_image
from ldm_jax.data.inpaint_masks import MaskGenerator
from ldm_jax.data.layout import compact_layout
from ldm_jax.data.skipping import ERROR_KEY, MISSING_CAPTION_KEY, error_record
from ldm_jax.data.transforms import Geometry

_INT_FIELDS = ("label", "num_objects", "box_labels")


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Decode the image, pick a caption (``missing_caption``: "empty" or "skip"), apply the geometry,
  then make the conditional inputs that are configured (``data.conditioning``)."""

  geometry: Geometry
  missing_caption: str = "empty"
  low_res: LowRes | None = None
  masks: MaskGenerator | None = None
  layout_max_objects: int = 0  # > 0: exactly this many objects per example
  num_seg_classes: int = 0  # > 0: label maps are checked against it

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
    if "original_size" in example:
      # SDXL-style micro-conditioning: (h, w) before any resize; the decoded size when the source does not know it.
      size = example["original_size"]
      out["original_size"] = np.asarray(out["image"].shape[:2] if size is None else size, np.int32)
    for key in _INT_FIELDS:
      if key in example:
        out[key] = np.asarray(example[key], np.int32)
    if "segmentation" in example:
      seg_where = example.get("segmentation_path", where)
      try:
        out["segmentation"] = decode_label_map(example["segmentation"], seg_where, self.num_seg_classes)
      except ValueError as error:
        return error_record(str(error))
      if out["segmentation"].shape != out["image"].shape[:2]:
        return error_record(f"{seg_where}: label map is {out['segmentation'].shape[1]}x{out['segmentation'].shape[0]}"
                            f" but its image {where} is {out['image'].shape[1]}x{out['image'].shape[0]}")
    if "boxes" in example:
      out["boxes"] = np.asarray(example["boxes"], np.float32).reshape(-1, 4)
      if self.layout_max_objects and "num_objects" not in out:  # a raw layout: every box is real
        out["num_objects"] = np.int32(len(out["boxes"]))
    out = self.geometry(out, rng)
    if self.layout_max_objects and "boxes" in out:
      labels = out.get("box_labels", np.zeros(len(out["boxes"]), np.int32))
      out.update(compact_layout(out["boxes"], labels, int(out["num_objects"]), self.layout_max_objects))
    if self.low_res is not None or self.masks is not None:
      # Own streams, drawn after the geometry's: crops stay what they were without these transforms.
      low_res_seed, mask_seed = (int(k) for k in rng.integers(0, 2**63, size=2))
      if self.low_res is not None:
        out["low_res"] = self.low_res(out["image"], np.random.default_rng(low_res_seed))
      if self.masks is not None:
        out["mask"] = self.masks(np.random.default_rng(mask_seed), *out["image"].shape[:2])
    return out
