"""Webdataset-style tar shards (what img2dataset writes) as a random-access source.

A sample is a run of consecutive tar members sharing a key: ``000123.jpg``
with ``000123.txt`` (its caption) and/or ``000123.json`` (metadata:
"caption", "width", "height", "original_width", ...). Opening reads every
shard's member headers once and keeps an index of where each sample's
members lie, so any sample is one ``pread`` away: that random access is what
lets grain shuffle globally, slice per process and resume mid-shard.

Nothing bad is silently dropped or replaced. A sample cut off by a truncated
shard, or without an image member, stays in the index as an entry that reads
as an error record (skipped and counted, ``data/skipped``); a corrupt image
fails in decoding, which counts it the same way. Samples dropped by the size
filters (``data.webdataset``) are counted apart, at open, since they are a
choice and not an error.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import io
import json
import os
import re
import tarfile

import numpy as np
from absl import logging
from PIL import Image

from ldm_jax.data.skipping import error_record

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # in order of preference when a sample has several
# A sample's state in the index: readable, cut off by a truncated shard, no image member.
_OK, _TRUNCATED, _NO_IMAGE = 0, 1, 2
# Shards indexed at once: reading headers is latency-bound on network file systems.
_INDEX_THREADS = 8
_GLOB_CHARS = re.compile(r"[*?\[]")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_HOW_TO = (
    "set config.data.path to tar shards: a brace pattern such as 'shards/{00000..00127}.tar', "
    "a glob such as 'shards/*.tar', or a folder of .tar files"
)
_WARNED_NOT_UTF8: set[str] = set()  # warned once per caption, not once per epoch


def expand_braces(pattern: str) -> list[str]:
  """Bash-style brace expansion: ``{00000..00127}`` (zero padding kept), ``{a,b}``, several braces.

  A brace holding neither a range nor a comma is kept literally, as bash does.
  """
  match = next((m for m in _BRACE.finditer(pattern) if _RANGE.match(m.group(1)) or "," in m.group(1)), None)
  if match is None:
    return [pattern]
  body = match.group(1)
  numbers = _RANGE.match(body)
  if numbers:
    first, last = numbers.groups()
    start, stop = int(first), int(last)
    # "{00000..00127}": a leading zero on either end pads every number to that width.
    padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-").startswith("0") for s in (first, last))
    width = max(len(first), len(last)) if padded else 0
    step = 1 if stop >= start else -1
    choices = [str(n).zfill(width) for n in range(start, stop + step, step)]
  else:
    choices = body.split(",")
  head, tail = pattern[:match.start()], pattern[match.end():]
  return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


def resolve_tar_shards(path: str, split: str) -> list[str]:
  """The shard files ``path`` names ("{split}" replaced; "::" joins several patterns).

  Each pattern is brace-expanded, then each result is a folder (its .tar
  files), a glob, or a file. Fails naming the pattern when it matches nothing
  and naming the files when brace-expanded names do not exist.
  """
  if not path:
    raise ValueError(f"config.data.path is empty; {_HOW_TO}.")
  shards = []
  for pattern in path.replace("{split}", split).split("::"):
    pattern = os.path.expanduser(pattern)
    missing = []
    for name in expand_braces(pattern):
      if os.path.isdir(name):
        found = sorted(glob.glob(os.path.join(glob.escape(name), "*.tar")))
        if not found:
          raise FileNotFoundError(f"Folder {name!r} (from data.path {pattern!r}) holds no .tar files; {_HOW_TO}.")
      elif _GLOB_CHARS.search(name):
        found = sorted(glob.glob(name))
        if not found:
          raise FileNotFoundError(f"No tar shards match {name!r} (data.path {pattern!r}, split {split!r}); {_HOW_TO}.")
      elif os.path.isfile(name):
        found = [name]
      else:
        found, missing = [], missing + [name]
      shards.extend(found)
    if missing:
      some = ", ".join(repr(m) for m in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
      raise FileNotFoundError(f"data.path {pattern!r} names {len(missing)} shard(s) that do not exist: {some}; "
                              f"{_HOW_TO}.")
  return list(dict.fromkeys(shards))  # the same file named twice is read once


def split_member_name(name: str) -> tuple[str, str]:
  """webdataset's convention: the key is the path up to the basename's first dot, the rest the extension."""
  directory, base = os.path.split(name)
  stem, dot, ext = base.partition(".")
  return os.path.join(directory, stem) if directory else stem, ext.lower() if dot else ""


@dataclasses.dataclass
class ShardIndex:
  """One shard's samples: member (offset, size) per field, -1 where a field is absent."""

  keys: list[str]
  members: np.ndarray  # (N, 3, 2) int64: image, txt, json x (offset, size)
  status: np.ndarray  # (N,) uint8: _OK, _TRUNCATED, _NO_IMAGE
  problem: str | None = None  # why the shard ends early, when it does


def _sample_row(fields: dict[str, tuple[int, int]]) -> tuple[np.ndarray, int]:
  row = np.full((3, 2), -1, np.int64)
  image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in fields), None)
  for i, ext in enumerate((image_ext, "txt", "json")):
    if ext is not None and ext in fields:
      row[i] = fields[ext]
  return row, _OK if image_ext else _NO_IMAGE


def index_shard(path: str) -> ShardIndex:
  """One pass over the member headers; a truncated shard keeps its complete samples.

  The sample that was being read where the shard ends early may be missing
  members, so it is marked truncated (read as an error record) rather than
  trusted.
  """
  file_size = os.path.getsize(path)
  keys, rows, status = [], [], []
  key, fields, problem = None, {}, None

  def finish(state=None):
    if key is not None:
      row, ok = _sample_row(fields)
      keys.append(key), rows.append(row), status.append(state if state is not None else ok)

  with open(path, "rb") as f:
    try:
      with tarfile.open(fileobj=f, mode="r:") as tar:
        for info in tar:
          if not info.isfile():
            continue
          member_key, ext = split_member_name(info.name)
          if member_key != key:
            finish()
            key, fields = member_key, {}
          if info.offset_data + info.size > file_size:
            problem = f"member {info.name!r} is cut off at byte {file_size} of {info.offset_data + info.size}"
            break
          fields[ext] = (info.offset_data, info.size)
        else:
          f.seek(tar.offset)
          # A complete archive ends with zero blocks; without them the last sample may be incomplete.
          if f.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
            problem = f"it ends at byte {file_size} without the end-of-archive marker"
    except tarfile.ReadError as error:
      if key is None and file_size >= tarfile.BLOCKSIZE:
        raise ValueError(f"Shard {path!r} is not an uncompressed tar file ({error}); compressed shards "
                         "(.tar.gz) cannot be read at random: decompress them first.") from None
      problem = f"{error} at byte {file_size}"
  finish(_TRUNCATED if problem else None)
  members = np.stack(rows) if rows else np.zeros((0, 3, 2), np.int64)
  return ShardIndex(keys, members, np.asarray(status, np.uint8), problem)


def _pread(fd: int, offset: int, size: int, where: str) -> bytes:
  data = os.pread(fd, size, offset)
  if len(data) != size:
    raise OSError(f"{where}: read {len(data)} of {size} bytes at offset {offset} (has the shard changed since it "
                  "was indexed?)")
  return data


class _MemberFile(io.RawIOBase):
  """A read-only file over one tar member, so PIL reads only an image's header."""

  def __init__(self, fd: int, offset: int, size: int):
    self._fd, self._offset, self._size, self._pos = fd, offset, size, 0

  def readable(self) -> bool:
    return True

  def seekable(self) -> bool:
    return True

  def tell(self) -> int:
    return self._pos

  def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
    self._pos = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence] + pos
    return self._pos

  def readinto(self, buffer) -> int:
    data = os.pread(self._fd, max(0, min(len(buffer), self._size - self._pos)), self._offset + self._pos)
    buffer[:len(data)] = data
    self._pos += len(data)
    return len(data)


def _json_size(metadata: dict) -> tuple[int, int] | None:
  """(h, w) before img2dataset resized the image, else as stored; None if the metadata has neither."""
  for h_key, w_key in (("original_height", "original_width"), ("height", "width")):
    h, w = metadata.get(h_key), metadata.get(w_key)
    if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
      return h, w
  return None


def _read_json(fd: int, offset: int, size: int, where: str) -> dict:
  metadata = json.loads(_pread(fd, offset, size, where))
  if not isinstance(metadata, dict):
    raise ValueError(f"{where}: the .json member holds a {type(metadata).__name__}, not an object")
  return metadata


def _size_for_filters(fd: int, row: np.ndarray, where: str) -> tuple[int, int] | None:
  """The size the filters judge: original size from the .json, else the image header's (no decoding)."""
  if row[2, 0] >= 0:
    try:
      size = _json_size(_read_json(fd, int(row[2, 0]), int(row[2, 1]), where))
      if size is not None:
        return size
    except ValueError:
      pass  # a bad .json fails the sample when it is read, which counts it
  try:
    # EXIF rotation may swap h and w, which changes neither the shorter side nor the aspect ratio.
    with Image.open(io.BufferedReader(_MemberFile(fd, int(row[0, 0]), int(row[0, 1])))) as image:
      return image.height, image.width
  except Exception:  # PIL raises many types on bad data; decoding will fail and count it.
    return None


def _filtered_by(size: tuple[int, int] | None, min_size: int, max_aspect_ratio: float) -> str | None:
  """None to keep the sample, else the filter that drops it."""
  if size is None:
    return None
  short, long = min(size), max(size)
  if min_size and short < min_size:
    return "min_size"
  if max_aspect_ratio and long > max_aspect_ratio * short:
    return "max_aspect_ratio"
  return None


class TarShardSource:
  """Random-access source: ``{"image": bytes, "caption": str | None, "path": "SHARD/KEY", "original_size"}``.

  ``original_size`` is the image's (h, w) before any resize by the downloader,
  from the sample's .json, or None when the .json does not say. ``min_size``
  (shorter side) and ``max_aspect_ratio`` (long / short side; 0 turns either
  off) drop samples at open; ``num_filtered`` counts them per filter.
  """

  def __init__(self, shards: list[str], min_size: int = 0, max_aspect_ratio: float = 0.0):
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
      raise ValueError(f"data.webdataset.min_size must be an integer >= 0 (0: off), got {min_size!r}.")
    if not isinstance(max_aspect_ratio, (int, float)) or not (max_aspect_ratio == 0 or max_aspect_ratio >= 1):
      raise ValueError(f"data.webdataset.max_aspect_ratio must be 0 (off) or >= 1, got {max_aspect_ratio!r}.")
    if not shards:
      raise ValueError(f"No tar shards given; {_HOW_TO}.")
    self.shards = list(shards)
    self.min_size, self.max_aspect_ratio = min_size, float(max_aspect_ratio)
    with concurrent.futures.ThreadPoolExecutor(min(_INDEX_THREADS, len(self.shards))) as pool:
      indices = list(pool.map(self._index_and_filter, self.shards))
    self.num_filtered = {"min_size": 0, "max_aspect_ratio": 0}
    for index, filtered in indices:
      for reason, count in filtered.items():
        self.num_filtered[reason] += count
    counts = [len(index.keys) for index, _ in indices]
    self._shard = np.repeat(np.arange(len(self.shards), dtype=np.int32), counts)
    # Keys as one fixed-width bytes array: compact, and cheap to pickle into grain's workers.
    # (tarfile decodes names that are not UTF-8 with surrogate escapes; they go back to their bytes.)
    self._keys = np.asarray([k.encode("utf-8", "surrogateescape") for index, _ in indices for k in index.keys],
                            dtype=bytes)
    self._members = np.concatenate([index.members for index, _ in indices])
    self._status = np.concatenate([index.status for index, _ in indices])
    self.num_broken = int(np.count_nonzero(self._status != _OK))  # read as error records, every epoch
    if any(self.num_filtered.values()):
      logging.info("webdataset: %d of %d samples filtered out (%s)", sum(self.num_filtered.values()),
                   sum(self.num_filtered.values()) + len(self), ", ".join(
                       f"{reason} {getattr(self, reason)}: {n}" for reason, n in self.num_filtered.items()))
    if len(self) == 0:
      raise ValueError(f"No samples in the {len(self.shards)} tar shard(s) {self.shards[:3]}"
                       + (f" after filtering ({self.num_filtered})" if any(self.num_filtered.values()) else "") + ".")

  def _index_and_filter(self, path: str) -> tuple[ShardIndex, dict[str, int]]:
    index = index_shard(path)
    if index.problem:
      logging.warning("Tar shard %s is truncated (%s): indexed its %d complete samples; %d cut-off sample(s) will "
                      "be skipped and counted (data/skipped)", path, index.problem,
                      int(np.sum(index.status != _TRUNCATED)), int(np.sum(index.status == _TRUNCATED)))
    filtered = {}
    if not (self.min_size or self.max_aspect_ratio):
      return index, filtered
    keep = np.ones(len(index.keys), bool)
    with open(path, "rb") as f:
      for i, row in enumerate(index.members):
        if index.status[i] == _OK:
          size = _size_for_filters(f.fileno(), row, f"{path}/{index.keys[i]}")
          reason = _filtered_by(size, self.min_size, self.max_aspect_ratio)
          if reason:
            keep[i], filtered[reason] = False, filtered.get(reason, 0) + 1
    kept = ShardIndex([k for k, kept in zip(index.keys, keep) if kept], index.members[keep], index.status[keep],
                      index.problem)
    return kept, filtered

  def __len__(self) -> int:
    return len(self._status)

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    shard = self.shards[self._shard[index]]
    where = f"{shard}/{self._keys[index].decode('utf-8', 'replace')}"
    status = self._status[index]
    if status == _TRUNCATED:
      return error_record(f"{where}: cut off by the end of a truncated shard")
    if status == _NO_IMAGE:
      return error_record(f"{where}: no image member ({', '.join('.' + e for e in IMAGE_EXTENSIONS)})")
    (image_at, image_len), (txt_at, txt_len), (json_at, json_len) = self._members[index].tolist()
    with open(shard, "rb") as f:
      fd = f.fileno()
      image = _pread(fd, image_at, image_len, where)
      text = _pread(fd, txt_at, txt_len, where) if txt_at >= 0 else None
      metadata = _read_json(fd, json_at, json_len, where) if json_at >= 0 else {}
    if text is not None:
      caption = _decode_caption(text, where)
    else:
      caption = next((metadata[k] for k in ("caption", "text") if _is_caption(metadata.get(k))), None)
    return {"image": image, "caption": caption, "path": where, "original_size": _json_size(metadata)}

  def __repr__(self) -> str:
    return f"TarShardSource(num_shards={len(self.shards)}, num_samples={len(self)})"


def _is_caption(value) -> bool:
  # A list of strings (several captions per image) is kept: the pipeline picks one at random.
  return isinstance(value, str) or (isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value))


def _decode_caption(raw: bytes, where: str) -> str:
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as error:
    if where not in _WARNED_NOT_UTF8:
      _WARNED_NOT_UTF8.add(where)
      logging.warning("Caption %s.txt is not valid UTF-8 (%s); its bad bytes are replaced by U+FFFD", where, error)
    text = raw.decode("utf-8", errors="replace")
  return text.strip()
