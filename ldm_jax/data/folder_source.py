"""A folder of images (searched recursively), each with an optional caption.

``cat.jpg`` is captioned by ``cat.txt`` beside it; without one the caption
is ``None`` (``data.missing_caption`` decides what training does with it).
Files are listed once, sorted by relative path, so indices (and hence
shuffles) are the same on every host.
"""

from __future__ import annotations

import os
from pathlib import Path

from absl import logging

from ldm_jax.data.images import IMAGE_EXTENSIONS

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


class ImageFolderSource:
  """Random-access source: ``{"image": bytes, "caption": str | None, "path": str}``."""

  def __init__(self, root: str | os.PathLike):
    self.root = str(Path(root).expanduser())
    self.paths = list_images(self.root)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict:
    path = os.path.join(self.root, self.paths[index])
    with open(path, "rb") as f:
      image_bytes = f.read()
    return {"image": image_bytes, "caption": find_caption(path), "path": self.paths[index]}

  def __repr__(self) -> str:
    return f"ImageFolderSource(root={self.root!r}, num_images={len(self)})"
