"""Inpainting masks made on the host: LaMa's strokes and boxes, and plain rectangles.

The paper's inpainting model follows LaMa's protocol (Suvorov et al. 2022; the
paper's appendix: "we used the code of [LaMa] to generate synthetic masks",
training on 256 px crops, evaluating on 512 px): masks from LaMa's
``saicinpainting/training/data/masks.py`` -- ``make_random_irregular_mask``
(polylines of thick lines) and ``make_random_rectangle_mask`` -- mixed as in its
training config ``abl-04-256-mh-dist.yaml`` ("train") or its evaluation sets
``configs/data_gen/random_{thick,medium,thin}_{256,512}.yaml``, which also drop
masks covering more than half the image (``max_tamper_area: 0.5``).

LaMa's sizes are pixels at 256 (or 512) px; at another image size every length
is scaled, so the masks are the same shapes relative to the image. Every random
choice comes from the ``np.random.Generator`` passed in: a record's mask is a pure
function of (seed, index) with ``np.random.default_rng([seed, index])``.
Masks are float32 (H, W, 1), 1 = hole (to inpaint), as the model's ``mask``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

MASK_KINDS = ("device_rectangles", "rectangles", "lama")  # "device_rectangles": the train step draws them


@dataclasses.dataclass(frozen=True)
class Strokes:
  """``make_random_irregular_mask``: ``min_times..max_times + 1`` polylines (LaMa's generator class
  passes ``max_times + 1``) of 1-5 segments, each ``10 + U{0..max_len-1}`` long and
  ``5 + U{0..max_width-1}`` wide, turning by whole radians."""

  max_len: int
  max_width: int
  min_times: int
  max_times: int
  max_angle: int = 4


@dataclasses.dataclass(frozen=True)
class Boxes:
  """``make_random_rectangle_mask``: ``min_times..max_times`` boxes with sides in
  ``[bbox_min_size, bbox_max_size]`` (LaMa's generator class passes ``bbox_max_size + 1`` as the
  exclusive bound), ``margin`` pixels from the border."""

  margin: int
  bbox_min_size: int
  bbox_max_size: int
  min_times: int
  max_times: int


@dataclasses.dataclass(frozen=True)
class LamaPreset:
  """LaMa's ``MixedMaskGenerator``: strokes with weight 1 or boxes with weight ``box_weight``."""

  strokes: Strokes
  boxes: Boxes | None
  box_weight: float
  size: int  # the image size LaMa's pixel values refer to
  max_hole_fraction: float = 1.0  # LaMa's evaluation sets: max_tamper_area 0.5


LAMA_PRESETS = {
    # configs/training/data/abl-04-256-mh-dist.yaml (the big LaMa's training masks).
    "train": LamaPreset(Strokes(200, 100, 1, 5), Boxes(10, 30, 150, 1, 4), 1.0, 256),
    # configs/data_gen/random_*_256.yaml and random_*_512.yaml (evaluation).
    "thick": LamaPreset(Strokes(200, 100, 1, 5), Boxes(10, 30, 150, 1, 3), 0.3, 256, 0.5),
    "medium": LamaPreset(Strokes(100, 50, 4, 5), Boxes(0, 10, 50, 1, 5), 0.3, 256, 0.5),
    "thin": LamaPreset(Strokes(40, 10, 4, 50), None, 0.0, 256, 0.5),
    "thick_512": LamaPreset(Strokes(450, 250, 1, 5), Boxes(10, 30, 300, 1, 4), 0.3, 512, 0.5),
    "medium_512": LamaPreset(Strokes(200, 100, 4, 10), Boxes(0, 30, 150, 1, 5), 0.3, 512, 0.5),
    "thin_512": LamaPreset(Strokes(100, 20, 4, 70), None, 0.0, 512, 0.5),
}
# Redraws allowed for a mask over max_hole_fraction before the smallest one drawn is used
# (LaMa draws 5 variants and keeps one of those under the limit).
_MAX_REDRAWS = 100


def draw_segment(mask_HxW: np.ndarray, start_xy: tuple[float, float], end_xy: tuple[float, float],
                 width: float) -> None:
  """Sets every pixel whose centre lies within ``width / 2`` of the segment (a line with round caps,
  as OpenCV draws thick lines); pixel (x, y) has its centre at (x, y)."""
  (x0, y0), (x1, y1) = start_xy, end_xy
  r = width / 2.0
  h, w = mask_HxW.shape
  xa, xb = max(0, int(np.floor(min(x0, x1) - r))), min(w, int(np.ceil(max(x0, x1) + r)) + 1)
  ya, yb = max(0, int(np.floor(min(y0, y1) - r))), min(h, int(np.ceil(max(y0, y1) + r)) + 1)
  if xa >= xb or ya >= yb:
    return
  y, x = np.mgrid[ya:yb, xa:xb].astype(np.float64)
  dx, dy = x1 - x0, y1 - y0
  length2 = dx * dx + dy * dy
  t = np.zeros_like(x) if length2 == 0 else np.clip(((x - x0) * dx + (y - y0) * dy) / length2, 0.0, 1.0)
  inside = (x - x0 - t * dx) ** 2 + (y - y0 - t * dy) ** 2 <= r * r
  mask_HxW[ya:yb, xa:xb] |= inside


def stroke_mask(rng: np.random.Generator, height: int, width: int, strokes: Strokes, scale: float = 1.0) -> np.ndarray:
  """LaMa's irregular mask on a canvas of ``height / scale`` x ``width / scale`` LaMa pixels,
  drawn at (height, width): bool (H, W)."""
  ref_h, ref_w = max(1, round(height / scale)), max(1, round(width / scale))
  mask = np.zeros((height, width), bool)
  to_real = lambda v: (v + 0.5) * scale - 0.5  # noqa: E731  (pixel centres stay centres)
  for i in range(int(rng.integers(strokes.min_times, strokes.max_times + 2))):
    x, y = int(rng.integers(ref_w)), int(rng.integers(ref_h))
    for _ in range(1 + int(rng.integers(5))):
      angle = 0.01 + int(rng.integers(strokes.max_angle))
      if i % 2 == 0:  # LaMa alternates the turning direction between strokes
        angle = 2 * 3.1415926 - angle
      length = 10 + int(rng.integers(strokes.max_len))
      brush = 5 + int(rng.integers(strokes.max_width))
      end_x = int(np.clip(int(x + length * np.sin(angle)), 0, ref_w))
      end_y = int(np.clip(int(y + length * np.cos(angle)), 0, ref_h))
      draw_segment(mask, (to_real(x), to_real(y)), (to_real(end_x), to_real(end_y)), brush * scale)
      x, y = end_x, end_y
  return mask


def box_mask(rng: np.random.Generator, height: int, width: int, boxes: Boxes, scale: float = 1.0) -> np.ndarray:
  """LaMa's rectangle mask, drawn in LaMa pixels and scaled to (height, width): bool (H, W)."""
  ref_h, ref_w = max(1, round(height / scale)), max(1, round(width / scale))
  mask = np.zeros((height, width), bool)
  max_size = min(boxes.bbox_max_size + 1, ref_h - 2 * boxes.margin, ref_w - 2 * boxes.margin)
  if max_size <= boxes.bbox_min_size:
    raise ValueError(f"a {height}x{width} image (LaMa size {ref_h}x{ref_w}) leaves no room for {boxes}")
  for _ in range(int(rng.integers(boxes.min_times, boxes.max_times + 1))):
    box_w, box_h = int(rng.integers(boxes.bbox_min_size, max_size)), int(rng.integers(boxes.bbox_min_size, max_size))
    x = int(rng.integers(boxes.margin, ref_w - boxes.margin - box_w + 1))
    y = int(rng.integers(boxes.margin, ref_h - boxes.margin - box_h + 1))
    mask[round(y * scale): round((y + box_h) * scale), round(x * scale): round((x + box_w) * scale)] = True
  return mask


def lama_mask(rng: np.random.Generator, height: int, width: int, preset: str | LamaPreset = "train") -> np.ndarray:
  """One LaMa mask at (height, width): float32 (H, W, 1), 1 = hole."""
  p = LAMA_PRESETS[preset] if isinstance(preset, str) else preset
  scale = min(height, width) / p.size
  best = None
  for _ in range(_MAX_REDRAWS):
    use_boxes = p.boxes is not None and rng.random() < p.box_weight / (1.0 + p.box_weight)
    mask = box_mask(rng, height, width, p.boxes, scale) if use_boxes else stroke_mask(rng, height, width, p.strokes,
                                                                                         scale)
    if best is None or mask.mean() < best.mean():
      best = mask
    if mask.mean() <= p.max_hole_fraction:
      best = mask
      break
  return best[..., None].astype(np.float32)


def rectangle_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """One rectangular hole, 10-60% of each side, anywhere (the train step's ``random_inpaint_masks``
  on the host): float32 (H, W, 1)."""
  size = rng.uniform(0.1, 0.6, 2) * np.array([height, width])
  start = rng.random(2) * (np.array([height, width]) - size)
  ys, xs = np.arange(height)[:, None], np.arange(width)[None, :]
  inside = (ys >= start[0]) & (ys < start[0] + size[0]) & (xs >= start[1]) & (xs < start[1] + size[1])
  return inside[..., None].astype(np.float32)


@dataclasses.dataclass(frozen=True)
class MaskGenerator:
  """The ``data.conditioning.masks`` transform: ``(rng, height, width) -> (H, W, 1)`` float32."""

  kind: str
  preset: str = "train"

  def __post_init__(self):
    if self.kind not in MASK_KINDS[1:]:
      raise ValueError(f"host mask kind must be one of {MASK_KINDS[1:]}, got {self.kind!r}")
    if self.kind == "lama" and self.preset not in LAMA_PRESETS:
      raise ValueError(f"data.conditioning.lama_preset must be one of {sorted(LAMA_PRESETS)}, got {self.preset!r}")

  def __call__(self, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    if self.kind == "lama":
      return lama_mask(rng, height, width, self.preset)
    return rectangle_mask(rng, height, width)
