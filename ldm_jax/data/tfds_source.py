"""TFDS datasets (prepared as ArrayRecord) and the built-in shapes dataset.

ArrayRecord data sources read without TensorFlow. Images stored with
``features.Image`` come back already decoded by TFDS (with PIL when OpenCV
is absent; ``decode_image`` then fixes the channel layout); encoded bytes in
other features are decoded by ``decode_image`` itself. A record TFDS cannot
read becomes an error record (see ``skipping``), not a crash.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import read_only_builder

from ldm_jax.data.captioned_shapes.captioned_shapes_dataset_builder import build_captioned_shapes
from ldm_jax.data.captioned_shapes.scene import MAX_OBJECTS

# Our field name -> path in a captioned_shapes record.
SHAPES_FIELDS = {
    "image": "image",
    "segmentation": "segmentation",
    "caption": "caption",
    "label": "label",
    "num_objects": "num_objects",
    "boxes": "objects/bbox",
    "box_labels": "objects/label",
}


def _lookup(record: Mapping[str, Any], path: str) -> Any:
  value = record
  for key in path.split("/"):
    value = value[key]
  return value


def _as_text(value: Any) -> str | list[str]:
  """A caption, or a list of alternatives when the field holds several."""
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  if isinstance(value, str):
    return value
  texts = [_as_text(v) for v in np.asarray(value, dtype=object).ravel()]
  return texts[0] if len(texts) == 1 else texts


class TfdsSource:
  """Random-access source renaming TFDS fields to ours (``fields``: ours -> theirs)."""

  def __init__(self, records, fields: Mapping[str, str], description: str):
    self._records = records
    self.fields = dict(fields)
    self.description = description

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict:
    record = self._records[index]
    example = {ours: _lookup(record, theirs) for ours, theirs in self.fields.items()}
    if "caption" in example:
      example["caption"] = _as_text(example["caption"])
    return example

  def __repr__(self) -> str:
    return f"TfdsSource({self.description}, num_records={len(self)})"


def _check_split(builder, name: str, split: str) -> None:
  """Fails naming the split when ``split`` (e.g. "train[:90%]+validation") is not in ``builder``."""
  for part in split.split("+"):
    base = part.split("[")[0].strip()
    if base not in builder.info.splits:
      raise ValueError(f"{name} has no split {base!r}; its splits are {sorted(builder.info.splits)}.")


def _prepared_copy(name: str, data_dir: str | None):
  """Builder for files already prepared on disk, without the builder's code."""
  try:
    return read_only_builder.builder_from_files(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    return None


def open_tfds(name: str, split: str, data_dir: str | None, fields: Mapping[str, str]) -> TfdsSource:
  """A prepared TFDS dataset, with errors that say what is missing and how to fix it.

  A copy prepared on disk is read from its own metadata, so datasets whose
  builder code needs TensorFlow (coco_captions, ...) still load without it.
  """
  if not name:
    raise ValueError("config.data.name is empty; set it to a TFDS dataset name such as 'imagenet2012'.")
  data_dir = data_dir or None
  description = f"{name}, split {split!r}"
  builder = _prepared_copy(name, data_dir)
  if builder is not None:
    _check_split(builder, f"TFDS dataset {name!r}", split)
    try:
      return TfdsSource(builder.as_data_source(split=split), fields, description)
    except Exception as error:
      raise RuntimeError(
          f"Cannot read TFDS dataset {name!r} from {builder.data_dir!r} as ArrayRecord ({error}). "
          "If it was prepared as TFRecord, convert it with `tfds convert_format`."
      ) from error
  # Nothing on disk: a registered name is simply unprepared (tfds.testing.mock_data
  # also lands here, and serves records).
  try:
    records = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(
        f"Unknown TFDS dataset {name!r}: no builder of that name is registered and no prepared copy "
        "was found (check the spelling, e.g. 'imagenet2012', 'celeb_a_hq/256')."
    ) from None
  except Exception as error:
    where = data_dir or "TFDS's default data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
    raise FileNotFoundError(
        f"TFDS dataset {name!r} is not prepared in {where!r}; prepare it with `tfds build {name} "
        f"--data_dir=DIR --file_format=array_record` (needs TensorFlow; any machine will do, then "
        "copy DIR here)."
    ) from error
  return TfdsSource(records, fields, description)


def open_shapes(
    split: str, data_dir: str | None, image_size: int, split_sizes: tuple[int, int, int], seed: int,
    max_objects: int = MAX_OBJECTS,
) -> TfdsSource:
  """The captioned-shapes split, built into ``data_dir`` on first use."""
  counts = [None if n < 0 else n for n in split_sizes]
  builder = build_captioned_shapes(data_dir or None, image_size, *counts, seed=seed, max_objects=max_objects)
  _check_split(builder, "captioned_shapes", split)
  records = builder.as_data_source(split=split)
  return TfdsSource(records, SHAPES_FIELDS, description=f"captioned_shapes, split {split!r}")
