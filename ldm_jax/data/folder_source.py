"""A folder of images (searched recursively), each with an optional caption.

``cat.jpg`` is captioned by ``cat.txt`` beside it; without one the caption
is empty. Files are listed once, sorted by relative path, so indices (and
hence shuffles) are the same on every host.
"""

from __future__ import annotations

import os
from pathlib import Path

from ldm_jax.data.images import IMAGE_EXTENSIONS

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


def read_caption(image_path: str | os.PathLike) -> str:
  """The text of the same-name ``.txt`` file, stripped; "" when there is none."""
  caption_path = Path(image_path).with_suffix(".txt")
  try:
    return caption_path.read_text(encoding="utf-8", errors="replace").strip()
  except FileNotFoundError:
    return ""


class ImageFolderSource:
  """Random-access source: ``{"image": bytes, "caption": str, "path": str}``."""

  def __init__(self, root: str | os.PathLike):
    self.root = str(Path(root).expanduser())
    self.paths = list_images(self.root)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict:
    path = os.path.join(self.root, self.paths[index])
    with open(path, "rb") as f:
      image_bytes = f.read()
    return {"image": image_bytes, "caption": read_caption(path), "path": self.paths[index]}

  def __repr__(self) -> str:
    return f"ImageFolderSource(root={self.root!r}, num_images={len(self)})"
