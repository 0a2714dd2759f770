"""Opening the configured dataset as a random-access source of examples.

Every source returns dicts in our field names (``image``, ``caption``,
``label``, ...), with the image still encoded or as stored. Opening checks
everything it can, so a missing dataset, split or folder fails before
training starts, with a message that names it and says how to prepare it.
"""

from __future__ import annotations

import ml_collections

from ldm_jax.data.array_record_source import ArrayRecordSource, resolve_shards
from ldm_jax.data.config import SOURCES
from ldm_jax.data.folder_source import ImageFolderSource
from ldm_jax.data.latent_records import open_latent_records, read_latent_metadata
from ldm_jax.data.tar_shards import TarShardSource, resolve_tar_shards
from ldm_jax.data.tfds_source import open_shapes, open_tfds


def open_source(data_config: ml_collections.ConfigDict, split: str):
  """The split of the configured dataset (``len()`` and ``[index]``)."""
  kind = data_config.source
  if kind == "shapes":
    shapes = data_config.shapes
    return open_shapes(
        split,
        data_config.data_dir,
        data_config.image_size,
        (shapes.num_train, shapes.num_validation, shapes.num_test),
        shapes.seed,
        shapes.max_objects,
    )
  if kind == "tfds":
    fields = {"image": data_config.image_key}
    if data_config.caption_key:
      fields["caption"] = data_config.caption_key
    if data_config.label_key:
      fields["label"] = data_config.label_key
    return open_tfds(data_config.name, split, data_config.data_dir, fields)
  if kind == "array_record":
    return ArrayRecordSource(resolve_shards(data_config.path, split))
  if kind == "folder":
    if not data_config.path:
      raise ValueError("config.data.path is empty; set it to a folder of images for source 'folder'.")
    return ImageFolderSource(data_config.path.replace("{split}", split))
  if kind == "webdataset":
    # .get: a config saved before this source existed has no such section.
    filters = data_config.get("webdataset") or {}
    return TarShardSource(
        resolve_tar_shards(data_config.path, split),
        min_size=filters.get("min_size", 0),
        max_aspect_ratio=filters.get("max_aspect_ratio", 0.0),
    )
  if kind == "latents":
    return open_latent_records(data_config.path, split, data_config.image_size)
  raise ValueError(f"Unknown data source {kind!r}; expected one of {SOURCES}.")


def has_captions(data_config: ml_collections.ConfigDict, split: str | None = None) -> bool:
  """Whether records carry a caption (for "folder", "array_record", "webdataset" it may be None: missing).

  For "latents", whether the precomputed records of ``split`` (default: the
  train split) kept their captions, as their metadata says.
  """
  if data_config.source == "latents":
    metadata = read_latent_metadata(data_config.path, split or data_config.train_split)
    return "caption" in metadata.get("fields", ())
  return data_config.source != "tfds" or bool(data_config.caption_key)
