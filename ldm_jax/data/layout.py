"""Object layouts (boxes + class labels) for the layout-to-image cond stage.

In the pipeline a layout is three fields, as the built-in shapes dataset and
TFDS detection datasets (coco, open_images) store them:

- ``boxes`` float32 (N, 4): normalised ``(ymin, xmin, ymax, xmax)``, TFDS's order;
- ``box_labels`` int32 (N,); ``num_objects`` int32: the first ones are real,
  the rest padding (zero boxes, label -1).

``pad_layout`` fixes N to ``data.conditioning.layout_max_objects`` so examples
batch; the model turns the batch into the layout encoder's tokens
(``LatentDiffusion.host_inputs``). A folder dataset gives each image its layout in
a JSON file beside it: ``cat.jpg`` -> ``cat.json`` holding
``{"boxes": [[x0, y0, x1, y1], ...], "labels": [...]}`` in normalised image coordinates.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

PAD_LABEL = -1


def pad_layout(boxes_Nx4: Any, labels_N: Any, max_objects: int) -> dict[str, np.ndarray]:
  """The first ``max_objects`` objects, padded to exactly ``max_objects``:
  ``{"boxes" (M, 4), "box_labels" (M,), "num_objects" ()}``."""
  boxes = np.asarray(boxes_Nx4, np.float32).reshape(-1, 4)[:max_objects]
  labels = np.asarray(labels_N, np.int32).reshape(-1)[:max_objects]
  n = len(labels)
  out_boxes = np.zeros((max_objects, 4), np.float32)
  out_labels = np.full((max_objects,), PAD_LABEL, np.int32)
  out_boxes[:n], out_labels[:n] = boxes, labels
  return {"boxes": out_boxes, "box_labels": out_labels, "num_objects": np.int32(n)}


def compact_layout(boxes_Nx4: np.ndarray, labels_N: np.ndarray, num_objects: int, max_objects: int) -> dict:
  """After a crop: drops the objects whose box no longer covers any area, then pads to ``max_objects``."""
  boxes, labels = np.asarray(boxes_Nx4)[:num_objects], np.asarray(labels_N)[:num_objects]
  visible = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  return pad_layout(boxes[visible], labels[visible], max_objects)


def _lookup(record: Mapping[str, Any], path: str) -> Any:
  value = record
  for key in path.split("/"):
    value = value[key]
  return value


def layout_from_tfds(record: Mapping[str, Any], max_objects: int, boxes_key: str = "objects/bbox",
                     labels_key: str = "objects/label") -> dict[str, np.ndarray]:
  """A TFDS detection record's objects (boxes already ``(ymin, xmin, ymax, xmax)``), padded."""
  boxes = np.asarray(_lookup(record, boxes_key), np.float32).reshape(-1, 4)
  labels = np.asarray(_lookup(record, labels_key)).reshape(-1)
  if len(boxes) != len(labels):
    raise ValueError(f"a record holds {len(boxes)} boxes but {len(labels)} labels ({boxes_key!r}, {labels_key!r})")
  return pad_layout(boxes, labels, max_objects)


def layout_path(image_path: str | os.PathLike) -> Path:
  """Where an image's layout lives: the same name with ``.json``."""
  return Path(image_path).with_suffix(".json")


def read_layout_json(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """``(boxes (N, 4) as (ymin, xmin, ymax, xmax), labels (N,))`` from a layout JSON file.

  Raises ValueError naming the file and the problem when it is not a valid layout.
  """
  try:
    with open(path, "rb") as f:
      data = json.loads(f.read())
  except FileNotFoundError:
    raise FileNotFoundError(f"no layout file {str(path)!r} (data.conditioning.layout_max_objects > 0 needs one "
                            "beside each image)") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise ValueError(f"layout file {str(path)!r} is not valid JSON: {error}") from None
  if not isinstance(data, dict) or "boxes" not in data or "labels" not in data:
    raise ValueError(f"layout file {str(path)!r} must hold an object with 'boxes' and 'labels'")
  try:
    boxes = np.asarray(data["boxes"], np.float64).reshape(-1, 4) if len(data["boxes"]) else np.zeros((0, 4))
    labels = np.asarray(data["labels"])
  except (TypeError, ValueError):
    raise ValueError(f"layout file {str(path)!r}: each box must be [x0, y0, x1, y1] (4 numbers)") from None
  if len(boxes) != len(data["boxes"]):
    raise ValueError(f"layout file {str(path)!r}: each box must be [x0, y0, x1, y1] (4 numbers)")
  if labels.ndim != 1 or len(labels) != len(boxes):
    raise ValueError(f"layout file {str(path)!r}: {len(boxes)} boxes but {labels.size} labels")
  if len(labels) and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0):
    raise ValueError(f"layout file {str(path)!r}: labels must be non-negative integers, got {labels.tolist()}")
  x0, y0, x1, y1 = boxes.T
  bad = ~((0 <= x0) & (x0 <= x1) & (x1 <= 1) & (0 <= y0) & (y0 <= y1) & (y1 <= 1))
  if np.any(bad):
    raise ValueError(f"layout file {str(path)!r}: boxes must be normalised [x0, y0, x1, y1] with 0 <= x0 <= x1 <= 1 "
                     f"and 0 <= y0 <= y1 <= 1; box {int(np.argmax(bad))} is {boxes[np.argmax(bad)].tolist()}")
  return np.stack([y0, x0, y1, x1], axis=1).astype(np.float32), labels.astype(np.int32)
