"""Deterministic, anti-aliased rendering of captioned-shapes scenes.

Each object is drawn as a coverage mask at ``supersample`` times the output
resolution and box-filtered down, so edges are anti-aliased. The same
coverage decides the segmentation (a pixel belongs to an object when at
least half of it is covered), and each box is the tight box of that object's
segmentation before occlusion, so image, segmentation and boxes agree.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from ldm_jax.data.captioned_shapes import vocabulary as vocab
from ldm_jax.data.captioned_shapes.scene import Background, SceneObject

# Small per-scene colour variation: keeps images from being pixel-identical
# while every colour stays far from every other (they are >= 100 apart).
_COLOUR_JITTER = 8


@dataclasses.dataclass(frozen=True)
class RenderedScene:
  image: np.ndarray  # (S, S, 3) uint8
  # (S, S) uint8: 0 = background, class label + 1 where an object is visible;
  # later objects occlude earlier ones.
  segmentation: np.ndarray
  # (num_objects, 4) float32, normalised (ymin, xmin, ymax, xmax), y down.
  boxes: np.ndarray


def _unit_outline(shape: str) -> np.ndarray | None:
  """Polygon vertices (x, y) inside [-0.5, 0.5]^2, or None for the circle."""
  if shape == "circle":
    return None
  if shape == "square":
    h = 0.43
    return np.array([(-h, -h), (h, -h), (h, h), (-h, h)])
  if shape == "triangle":
    return np.array([(0.0, -0.5), (0.5, 0.366), (-0.5, 0.366)])
  if shape == "diamond":
    return np.array([(0.0, -0.5), (0.36, 0.0), (0.0, 0.5), (-0.36, 0.0)])
  if shape == "hexagon":
    angles = np.deg2rad(np.arange(6) * 60.0)
    return 0.5 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
  if shape == "star":
    angles = np.deg2rad(np.arange(10) * 36.0 - 90.0)
    radii = np.where(np.arange(10) % 2 == 0, 0.5, 0.2)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
  raise ValueError(f"Unknown shape {shape!r}; expected one of {vocab.SHAPES}.")


def object_coverage(
    obj: SceneObject, image_size: int, supersample: int
) -> tuple[np.ndarray, tuple[int, int]]:
  """Fraction of each pixel covered by ``obj``, within its bounding region.

  Returns the (h, w) float32 coverage and the region's (top, left) pixel;
  drawing only the region keeps rendering cheap.
  """
  half = obj.extent * image_size / 2
  center_y, center_x = obj.center_yx[0] * image_size, obj.center_yx[1] * image_size
  top, left = max(0, int(center_y - half) - 1), max(0, int(center_x - half) - 1)
  bottom = min(image_size, int(np.ceil(center_y + half)) + 1)
  right = min(image_size, int(np.ceil(center_x + half)) + 1)
  canvas = Image.new("L", ((right - left) * supersample, (bottom - top) * supersample), 0)
  draw = ImageDraw.Draw(canvas)
  # Object geometry in canvas pixels.
  radius = half * supersample
  origin = ((center_x - left) * supersample, (center_y - top) * supersample)
  outline = _unit_outline(obj.shape)
  if outline is None:
    draw.ellipse((origin[0] - radius, origin[1] - radius, origin[0] + radius, origin[1] + radius), fill=255)
  else:
    points = outline * (2 * radius) + origin
    draw.polygon([tuple(p) for p in points], fill=255)
  return np.asarray(canvas.reduce(supersample), np.float32) / 255.0, (top, left)


def _jittered(rgb: tuple[int, int, int], rng: np.random.Generator | None) -> np.ndarray:
  colour = np.array(rgb, np.float32)
  if rng is not None:
    colour += rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, size=3)
  return np.clip(colour, 0, 255)


def render_background(
    background: Background, image_size: int, rng: np.random.Generator | None = None
) -> np.ndarray:
  """(S, S, 3) float32 background in [0, 255]."""
  tones = [_jittered(vocab.BACKGROUND_TONES[name], rng) for name in background.tones]
  image = np.empty((image_size, image_size, 3), np.float32)
  image[:] = tones[0]
  if background.split != "none":
    if len(tones) != 2:
      raise ValueError(f"A split background needs two tones, got {background.tones}.")
    cut = int(round(background.split_at * image_size))
    if background.split == "horizontal":
      image[cut:] = tones[1]
    elif background.split == "vertical":
      image[:, cut:] = tones[1]
    else:
      raise ValueError(f"Unknown background split {background.split!r}.")
  return image


def render_scene(
    objects: Sequence[SceneObject],
    image_size: int,
    background: Background,
    rng: np.random.Generator | None = None,
    supersample: int | None = None,
) -> RenderedScene:
  """Draws ``objects`` in order (later on top) over ``background``.

  ``rng`` (optional) jitters colours slightly; the same rng state gives the
  same pixels. A single object is just ``objects=[obj]``.
  """
  if image_size < 8:
    raise ValueError(f"image_size must be at least 8, got {image_size}.")
  if supersample is None:
    supersample = 4 if image_size <= 64 else 2
  image = render_background(background, image_size, rng)
  segmentation = np.zeros((image_size, image_size), np.uint8)
  boxes = np.zeros((len(objects), 4), np.float32)
  for i, obj in enumerate(objects):
    coverage, (top, left) = object_coverage(obj, image_size, supersample)
    region = (slice(top, top + coverage.shape[0]), slice(left, left + coverage.shape[1]))
    colour = _jittered(vocab.COLOURS[obj.colour], rng)
    image[region] += (colour - image[region]) * coverage[..., None]
    inside = coverage >= 0.5
    segmentation[region][inside] = obj.label + 1
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    if rows.size:
      boxes[i] = (top + rows[0], left + cols[0], top + rows[-1] + 1, left + cols[-1] + 1)
  return RenderedScene(
      image=np.round(image).astype(np.uint8),
      segmentation=segmentation,
      boxes=boxes / image_size,
  )
