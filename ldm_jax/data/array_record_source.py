"""Our ArrayRecord format: one msgpack map per record.

Each record holds the encoded image file's bytes as they were on disk (no
re-encoding, so no quality loss), its caption (nil when the image had no
caption file) and its relative path. Shards are written with
``group_size:1`` so any record can be read directly. A
``<prefix>.metadata.json`` beside the shards says what they hold.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Iterable

import msgpack
from array_record.python import array_record_data_source, array_record_module

FORMAT = "ldm_jax.image_caption.v1"
SHARD_PATTERN = "{prefix}.array_record-{index:05d}-of-{count:05d}"
_HOW_TO = (
    "write shards with `python -m ldm_jax.data.prepare --input IMAGE_DIR --output OUT_DIR` "
    "and set config.data.path to OUT_DIR or a glob such as 'OUT_DIR/{split}.array_record-*'"
)


def encode_record(image_bytes: bytes, caption: str | None, path: str) -> bytes:
  return msgpack.packb({"image": image_bytes, "caption": caption, "path": path}, use_bin_type=True)


def decode_record(record: bytes) -> dict:
  fields = msgpack.unpackb(record, raw=False)
  return {"image": fields["image"], "caption": fields["caption"], "path": fields["path"]}


def write_shards(
    records: Iterable[bytes], num_records: int, output_dir: str | os.PathLike, prefix: str, num_shards: int
) -> list[str]:
  """Writes ``records`` in order into ``num_shards`` contiguous shards."""
  if num_shards < 1:
    raise ValueError(f"num_shards must be at least 1, got {num_shards}.")
  num_shards = min(num_shards, max(num_records, 1))
  os.makedirs(output_dir, exist_ok=True)
  paths = [
      os.path.join(output_dir, SHARD_PATTERN.format(prefix=prefix, index=i, count=num_shards))
      for i in range(num_shards)
  ]
  records = iter(records)
  for shard, path in enumerate(paths):
    # Shard sizes differ by at most one record.
    shard_size = num_records // num_shards + (shard < num_records % num_shards)
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    try:
      for _ in range(shard_size):
        writer.write(next(records))
    finally:
      writer.close()
  return paths


def resolve_shards(path: str, split: str) -> list[str]:
  """Shard files for ``path`` (a folder or glob; "{split}" is replaced)."""
  if not path:
    raise ValueError(f"config.data.path is empty; {_HOW_TO}.")
  path = os.path.expanduser(path.replace("{split}", split))
  pattern = os.path.join(path, f"{split}.array_record-*") if os.path.isdir(path) else path
  shards = sorted(glob.glob(pattern))
  if not shards:
    raise FileNotFoundError(f"No ArrayRecord shards match {pattern!r} (split {split!r}); {_HOW_TO}.")
  return shards


class ArrayRecordSource:
  """Random-access source over our shards: dicts like ``decode_record``'s."""

  def __init__(self, shards: list[str]):
    self.shards = shards
    self._records = array_record_data_source.ArrayRecordDataSource(shards)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict:
    return decode_record(self._records[index])

  def __repr__(self) -> str:
    return f"ArrayRecordSource(num_shards={len(self.shards)}, num_records={len(self)})"


def write_metadata(output_dir: str | os.PathLike, prefix: str, metadata: dict) -> str:
  path = Path(output_dir) / f"{prefix}.metadata.json"
  path.write_text(json.dumps({"format": FORMAT, **metadata}, indent=2) + "\n")
  return str(path)
