"""A folder of images (searched recursively), each with an optional caption.

``cat.jpg`` is captioned by ``cat.txt`` beside it; without one the caption
is ``None`` (``data.missing_caption`` decides what training does with it).
Files are listed once, sorted by relative path, so indices (and hence
shuffles) are the same on every host.

For the conditional tasks an image may also have a layout, ``cat.json`` beside
it (see ``layout``), and a label map: ``<segmentation root>/<relative path>.png``
for ``<root>/<relative path>.jpg`` -- a separate folder, so that label-map PNGs
are never listed as images.
"""

from __future__ import annotations

import copy
import io
import os
from pathlib import Path

import numpy as np
from absl import logging
from PIL import Image

from ldm_jax.data.images import IMAGE_EXTENSIONS
from ldm_jax.data.layout import layout_path, read_layout_json

_WARNED_NOT_UTF8: set[str] = set()  # warned once per file, not once per epoch

_HOW_TO = "set config.data.path to a folder of .jpg/.jpeg/.png/.webp/.bmp images (searched recursively)"


def list_images(root: str | os.PathLike) -> list[str]:
  """Relative paths of the images under ``root``, sorted. Fails if none."""
  root = Path(root).expanduser()
  if not root.is_dir():
    raise FileNotFoundError(f"Image folder {str(root)!r} does not exist; {_HOW_TO}.")
  found = []
  for directory, _, files in os.walk(root, followlinks=True):
    for name in files:
      if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
        found.append(os.path.relpath(os.path.join(directory, name), root))
  if not found:
    raise ValueError(f"Image folder {str(root)!r} holds no images; {_HOW_TO}.")
  return sorted(found)


def find_caption(image_path: str | os.PathLike) -> str | None:
  """The text of the same-name ``.txt`` file, stripped; None when there is none.

  Bytes that are not UTF-8 become U+FFFD, with a warning naming the file.
  """
  caption_path = Path(image_path).with_suffix(".txt")
  try:
    raw = caption_path.read_bytes()
  except FileNotFoundError:
    return None
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as error:
    if str(caption_path) not in _WARNED_NOT_UTF8:
      _WARNED_NOT_UTF8.add(str(caption_path))
      logging.warning("Caption %s is not valid UTF-8 (%s); its bad bytes are replaced by U+FFFD", caption_path, error)
    text = raw.decode("utf-8", errors="replace")
  return text.strip()


def read_caption(image_path: str | os.PathLike) -> str:
  """Like ``find_caption``, but "" when there is no caption file."""
  caption = find_caption(image_path)
  return "" if caption is None else caption


def label_map_path(segmentation_root: str | os.PathLike, relative_image_path: str) -> Path:
  """The label map of an image: same relative path under ``segmentation_root``, extension ``.png``."""
  return (Path(segmentation_root).expanduser() / relative_image_path).with_suffix(".png")


def decode_label_map(value: bytes | np.ndarray, where: str, num_classes: int = 0) -> np.ndarray:
  """(H, W) class ids from a single-channel PNG (8-bit grey or palette indices: uint8; 16-bit: int32)
  or an array. Raises ValueError naming ``where`` for colour images or ids >= ``num_classes`` (> 0)."""
  if isinstance(value, (bytes, bytearray, memoryview)):
    try:
      with Image.open(io.BytesIO(value)) as image:
        image.load()
        if image.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
          raise ValueError(f"{where}: a label map must be a single-channel PNG of class ids (mode L, P or "
                           f"16-bit), not mode {image.mode}")
        labels = np.asarray(image)
    except ValueError:
      raise
    except Exception as error:  # PIL's plugins raise many types on bad data.
      raise ValueError(f"{where}: cannot decode label map: {error}") from error
  else:
    labels = np.asarray(value)
  if labels.ndim != 2:
    raise ValueError(f"{where}: a label map must be (H, W), got shape {labels.shape}")
  if labels.dtype != np.uint8:
    labels = labels.astype(np.int32)
  if num_classes > 0 and labels.size and int(labels.max()) >= num_classes:
    raise ValueError(f"{where}: label map holds class id {int(labels.max())}, but "
                     f"data.conditioning.num_seg_classes is {num_classes} (ids must lie in [0, {num_classes}))")
  return labels


class ImageFolderSource:
  """Random-access source: ``{"image": bytes, "caption": str | None, "path": str}``, plus
  ``"segmentation"`` (PNG bytes) and ``"segmentation_path"`` with a ``segmentation_root``, and
  ``"boxes"``, ``"box_labels"`` with ``read_layout``."""

  def __init__(self, root: str | os.PathLike, *, segmentation_root: str | os.PathLike | None = None,
               read_layout: bool = False):
    self.root = str(Path(root).expanduser())
    self.paths = list_images(self.root)
    self._set_conditions(segmentation_root, read_layout)

  def _set_conditions(self, segmentation_root, read_layout) -> None:
    self.segmentation_root = str(Path(segmentation_root).expanduser()) if segmentation_root else None
    if self.segmentation_root and not os.path.isdir(self.segmentation_root):
      raise FileNotFoundError(f"Label-map folder {self.segmentation_root!r} (data.conditioning.segmentation_folder) "
                              "does not exist.")
    self.read_layout = bool(read_layout)

  def with_conditions(self, segmentation_root: str | os.PathLike | None = None,
                      read_layout: bool = False) -> ImageFolderSource:
    """The same images (not listed again) with label maps and/or layouts."""
    source = copy.copy(self)
    source._set_conditions(segmentation_root, read_layout)
    return source

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict:
    path = os.path.join(self.root, self.paths[index])
    with open(path, "rb") as f:
      image_bytes = f.read()
    record = {"image": image_bytes, "caption": find_caption(path), "path": self.paths[index]}
    if self.segmentation_root:
      seg_path = label_map_path(self.segmentation_root, self.paths[index])
      try:
        record["segmentation"] = seg_path.read_bytes()
      except FileNotFoundError:
        raise FileNotFoundError(f"{self.paths[index]} has no label map {str(seg_path)!r}") from None
      record["segmentation_path"] = str(seg_path)
    if self.read_layout:
      record["boxes"], record["box_labels"] = read_layout_json(layout_path(path))
    return record

  def __repr__(self) -> str:
    return f"ImageFolderSource(root={self.root!r}, num_images={len(self)})"
