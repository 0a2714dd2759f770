"""Turning whatever a source stores into an RGB uint8 array.

Sources hand over encoded bytes (image folders, ArrayRecord shards) or
arrays that TFDS already decoded. Both end up as (H, W, 3) uint8 RGB:
grayscale is repeated, palette and CMYK are converted, 16-bit is scaled to
8 bits, and transparency is composited onto white (the usual convention for
product shots and logos, where the transparent part is "paper").
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class UnreadableImageError(ValueError):
  """The bytes or array are not an image we can use."""


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
  alpha = rgba[..., 3:4].astype(np.float32) / 255.0
  rgb = rgba[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
  return np.round(rgb).astype(np.uint8)


def pil_to_rgb(image: Image.Image) -> np.ndarray:
  """(H, W, 3) uint8 RGB from any PIL image mode."""
  mode = image.mode
  if mode == "RGB":
    return np.asarray(image)
  if mode.startswith("I") or mode == "F":
    # 16/32-bit grayscale (e.g. 16-bit PNG opens as "I;16" or "I"):
    # values span 0..65535, so scale to 0..255.
    gray = np.asarray(image, dtype=np.float32) / 257.0
    gray = np.clip(np.round(gray), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)
  has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
      mode == "P" and "transparency" in image.info
  )
  if has_alpha:
    return _composite_on_white(np.asarray(image.convert("RGBA")))
  return np.asarray(image.convert("RGB"))


def decode_image(value: bytes | np.ndarray) -> np.ndarray:
  """(H, W, 3) uint8 RGB from encoded bytes or a decoded array.

  Raises UnreadableImageError for corrupt or truncated data.
  """
  if isinstance(value, (bytes, bytearray, memoryview)):
    try:
      with Image.open(io.BytesIO(value)) as image:
        image.load()  # Decodes everything now, so truncation shows here.
        image = ImageOps.exif_transpose(image)  # Camera photos carry rotation in EXIF.
        return pil_to_rgb(image)
    except Exception as error:  # PIL's plugins raise many types on bad data.
      raise UnreadableImageError(f"cannot decode image: {error}") from error
  return array_to_rgb(np.asarray(value))


def array_to_rgb(array: np.ndarray) -> np.ndarray:
  """(H, W, 3) uint8 RGB from (H, W), (H, W, 1|3|4) uint8 or uint16 arrays."""
  if array.dtype == np.uint16:
    array = np.round(array.astype(np.float32) / 257.0).astype(np.uint8)
  if array.dtype != np.uint8:
    raise UnreadableImageError(f"expected a uint8 or uint16 image array, got {array.dtype}")
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
    raise UnreadableImageError(f"expected an (H, W, 1|3|4) image array, got shape {array.shape}")
  if array.shape[-1] == 1:
    return np.repeat(array, 3, axis=-1)
  if array.shape[-1] == 4:
    return _composite_on_white(array)
  return array
