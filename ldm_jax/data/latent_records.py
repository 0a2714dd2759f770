"""Precomputed latents as ArrayRecord shards: the format ``ldm_jax.latents.v1``.

``precompute_latents.py`` encodes each image once with a frozen first stage and
writes one msgpack map per record: ``latent_mean`` (H, W, C, float16 or
float32, *unscaled*: the model multiplies by its scale factor), optionally
``latent_logvar`` (KL first stages: the train step still draws a fresh
posterior sample), ``context`` (a frozen text encoder's output), ``tokens`` /
``attention_mask``, ``label`` and the layout fields, as arrays
``{"dtype", "shape", "data"}``; ``caption`` (a string, or a list of them) and
``path`` as text. Shards use ``group_size:1`` (random access) and are named
``{split}.latents.array_record-00000-of-00004``; ``{split}.latents.metadata.json``
beside them says which first stage, image size, latent shape and dtype made
them. Training reads them with ``data.source = "latents"`` and ``data.path``
the folder.

Knows nothing of models: the identities in the metadata are made by the
caller (``ldm_jax.training.latent_records_check``).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Iterable

import msgpack
import numpy as np
from array_record.python import array_record_data_source, array_record_module

from ldm_jax.data.array_record_source import ArrayRecordSource
from ldm_jax.data.skipping import ERROR_KEY

FORMAT = "ldm_jax.latents.v1"
SHARD_PATTERN = "{split}.latents.array_record-{index:05d}-of-{count:05d}"
METADATA_PATTERN = "{split}.latents.metadata.json"
LATENT_DTYPES = ("float16", "float32")
TEXT_FIELDS = ("caption", "path")
# Stored in the writer's dtype; the pipeline hands them to the step as float32.
FLOAT_FIELDS = ("latent_mean", "latent_logvar", "context")
_HOW_TO = ("write them with `python precompute_latents.py --config configs/ldm.py:VARIANT --out DIR` "
           "and set config.data.path to DIR")


# ------------------------------------------------------------------ records
def _encode_array(value: Any, field: str) -> dict:
  a = np.asarray(value)
  if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
    raise TypeError(f"latent record field {field!r} must be numeric, got dtype {a.dtype}")
  a = np.array(a, order="C", copy=None)  # not ascontiguousarray: it makes scalars 1-D
  return {"dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}


def _decode_array(value: dict) -> np.ndarray:
  return np.frombuffer(value["data"], dtype=np.dtype(value["dtype"])).reshape(value["shape"])


def encode_record(fields: dict[str, Any]) -> bytes:
  """One record: ``latent_mean`` required; numeric fields as arrays, ``caption`` / ``path`` as text."""
  if "latent_mean" not in fields:
    raise ValueError(f"a latent record needs 'latent_mean'; got {sorted(fields)}")
  packed = {}
  for key, value in fields.items():
    if key in TEXT_FIELDS:
      if not (value is None or isinstance(value, str) or
              (isinstance(value, (list, tuple)) and all(isinstance(c, str) for c in value))):
        raise TypeError(f"latent record field {key!r} must be a string or a list of strings, got {type(value)}")
      packed[key] = list(value) if isinstance(value, tuple) else value
    else:
      packed[key] = _encode_array(value, key)
  return msgpack.packb(packed, use_bin_type=True)


def decode_record(record: bytes) -> dict[str, Any]:
  """The fields of ``encode_record``: arrays (read-only views of the record) and text."""
  fields = msgpack.unpackb(record, raw=False)
  return {k: v if k in TEXT_FIELDS else _decode_array(v) for k, v in fields.items()}


# ------------------------------------------------------------------ shards
def shard_name(split: str, index: int, count: int) -> str:
  return SHARD_PATTERN.format(split=split, index=index, count=count)


def shard_ranges(num_records: int, num_shards: int) -> list[tuple[int, int]]:
  """Contiguous ``[start, stop)`` ranges of the source, sizes differing by at most one."""
  if num_shards < 1:
    raise ValueError(f"num_shards must be at least 1, got {num_shards}")
  num_shards = min(num_shards, max(num_records, 1))
  bounds = [i * num_records // num_shards for i in range(num_shards + 1)]
  return list(zip(bounds[:-1], bounds[1:]))


def write_shard(path: str, records: Iterable[bytes]) -> int:
  """Writes ``records`` into ``path`` atomically (a killed writer leaves no shard); returns their number."""
  tmp = path + ".tmp"
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
  count = 0
  try:
    for record in records:
      writer.write(record)
      count += 1
  finally:
    writer.close()
  os.replace(tmp, path)
  return count


def count_records(path: str) -> int:
  return len(array_record_data_source.ArrayRecordDataSource([path]))


# ------------------------------------------------------------------ metadata
def json_view(value: Any) -> Any:
  """``value`` as it reads back from the metadata file (tuples become lists), for comparisons."""
  return json.loads(json.dumps(value, default=str))


def metadata_path(directory: str, split: str) -> str:
  return os.path.join(directory, METADATA_PATTERN.format(split=split))


def write_metadata(directory: str, split: str, metadata: dict) -> str:
  """Writes ``{split}.latents.metadata.json`` atomically (several processes may write the same one)."""
  path = metadata_path(directory, split)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump({"format": FORMAT, **metadata}, f, indent=2)
    f.write("\n")
  os.replace(tmp, path)
  return path


def read_metadata_file(path: str) -> dict:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no latent metadata {path!r}; {_HOW_TO}.")
  try:
    with open(path) as f:
      metadata = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); rerun precompute_latents.py to rewrite it") from None
  if metadata.get("format") != FORMAT:
    raise ValueError(f"{path} describes format {metadata.get('format')!r}, not {FORMAT!r}")
  return metadata


def _folder_of(path: str, split: str) -> str:
  if not path:
    raise ValueError(f"config.data.path is empty; {_HOW_TO}.")
  return os.path.expanduser(path.replace("{split}", split))


def read_latent_metadata(path: str, split: str) -> dict:
  """The metadata of ``split`` in the folder ``path`` ("{split}" is replaced); refuses unfinished ones."""
  file = metadata_path(_folder_of(path, split), split)
  metadata = read_metadata_file(file)
  if not metadata.get("complete", False):
    raise ValueError(f"{file}: the latents of split {split!r} are unfinished (a precompute run stopped); "
                     "rerun the same precompute_latents.py command to finish them")
  return metadata


def resolve_latent_shards(path: str, split: str) -> tuple[list[str], dict]:
  """``(shard paths, metadata)`` of ``split`` in the folder ``path``; every shard the metadata names must exist."""
  folder = _folder_of(path, split)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"latents folder {folder!r} does not exist; {_HOW_TO}.")
  metadata = read_latent_metadata(path, split)
  count = metadata["num_shards"]
  shards = [os.path.join(folder, shard_name(split, i, count)) for i in range(count)]
  missing = [s for s in shards if not os.path.isfile(s)]
  if missing:
    raise FileNotFoundError(f"{metadata_path(folder, split)} names {count} shards but {len(missing)} are missing, "
                            f"e.g. {missing[0]}")
  stray = sorted(set(glob.glob(os.path.join(folder, f"{split}.latents.array_record-*"))) - set(shards))
  stray = [s for s in stray if not s.endswith(".tmp")]
  if stray:
    raise ValueError(f"{folder} holds shards of split {split!r} that its metadata does not name (another "
                     f"--num_shards?), e.g. {stray[0]}; delete them or write the latents to a new folder")
  return shards, metadata


class LatentRecordSource(ArrayRecordSource):
  """Random-access source over latent shards: dicts like ``decode_record``'s, with the shards' ``metadata``."""

  def __init__(self, shards: list[str], metadata: dict | None = None):
    super().__init__(shards)
    self.metadata = metadata or {}

  def __getitem__(self, index: int) -> dict:
    return decode_record(self._records[index])

  def __repr__(self) -> str:
    return f"LatentRecordSource(num_shards={len(self.shards)}, num_records={len(self)})"


def open_latent_records(path: str, split: str, image_size: int) -> LatentRecordSource:
  """The latents of ``split``; refuses records made at another image size than the run's."""
  shards, metadata = resolve_latent_shards(path, split)
  if metadata["image_size"] != image_size:
    raise ValueError(f"{metadata_path(_folder_of(path, split), split)}: the latents were made from "
                     f"{metadata['image_size']}px images but config.data.image_size is {image_size}; "
                     f"set it to {metadata['image_size']} or precompute the latents again")
  return LatentRecordSource(shards, metadata)


# ------------------------------------------------------------------ pipeline
class LatentExample:
  """A decoded record -> one example of a batch (in grain's ``random_map``).

  Float fields become float32 (the step's dtype); a list of captions gives a
  random one, as ``Preprocess`` does for images; ``path`` is dropped (images'
  batches carry none either).
  """

  def __call__(self, example: dict, rng: np.random.Generator) -> dict:
    if ERROR_KEY in example:
      return example
    out = {}
    for key, value in example.items():
      if key == "path":
        continue
      if key == "caption":
        out[key] = value[rng.integers(len(value))] if isinstance(value, list) else ("" if value is None else value)
      elif key in FLOAT_FIELDS:
        out[key] = value.astype(np.float32)
      else:
        out[key] = np.array(value)  # writable and owned: the record's buffer may be reused
    return out
