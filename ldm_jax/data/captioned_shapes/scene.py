"""Scenes of the captioned-shapes dataset: what is where, and its caption.

Coordinates are normalised to [0, 1] with y pointing down (row order), so
``center_yx = (0.2, 0.8)`` is near the top-right corner.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ldm_jax.data.captioned_shapes import vocabulary as vocab

MAX_OBJECTS = 3
# Bounding squares of two objects may overlap by at most this fraction of the
# smaller one: a little occlusion happens, but spatial relations stay clear.
_MAX_OVERLAP = 0.15
_PLACEMENT_TRIES = 100
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class SceneObject:
  shape: str
  colour: str
  size: str
  center_yx: tuple[float, float]

  @property
  def label(self) -> int:
    return vocab.class_label(self.colour, self.shape)

  @property
  def extent(self) -> float:
    """Side of the object's bounding square, as a fraction of the image."""
    return vocab.SIZES[self.size]

  def phrase(self) -> str:
    return vocab.single_object_prompt(self.colour, self.shape, self.size)


@dataclasses.dataclass(frozen=True)
class Background:
  """One tone, or two tones split by a horizontal or vertical line."""

  tones: tuple[str, ...]
  split: str = "none"  # "none" | "horizontal" | "vertical"
  split_at: float = 0.5  # position of the dividing line, as a fraction


def relation(a: SceneObject, b: SceneObject) -> str:
  """Where ``a`` is relative to ``b``, along the axis where they differ most."""
  dy = a.center_yx[0] - b.center_yx[0]
  dx = a.center_yx[1] - b.center_yx[1]
  if abs(dx) >= abs(dy):
    return "to the left of" if dx < 0 else "to the right of"
  return "above" if dy < 0 else "below"


def caption(objects: list[SceneObject] | tuple[SceneObject, ...]) -> str:
  """English caption naming every object and how they are placed.

  e.g. "a large red circle to the left of a small blue square, and a small
  green star below the red circle".
  """
  if not 1 <= len(objects) <= MAX_OBJECTS:
    raise ValueError(f"A scene has 1 to {MAX_OBJECTS} objects, got {len(objects)}.")
  first = objects[0]
  text = first.phrase()
  if len(objects) >= 2:
    text += f" {relation(first, objects[1])} {objects[1].phrase()}"
  if len(objects) == 3:
    third = objects[2]
    text += f", and {third.phrase()} {relation(third, first)} the {first.colour} {first.shape}"
  return text


def check_max_objects(max_objects: int) -> int:
  if not 1 <= max_objects <= MAX_OBJECTS:
    raise ValueError(f"max_objects must be between 1 and {MAX_OBJECTS}, got {max_objects}.")
  return max_objects


def _overlap_fraction(a: SceneObject, b: SceneObject) -> float:
  overlap = 1.0
  for axis in (0, 1):
    lo = max(a.center_yx[axis] - a.extent / 2, b.center_yx[axis] - b.extent / 2)
    hi = min(a.center_yx[axis] + a.extent / 2, b.center_yx[axis] + b.extent / 2)
    overlap *= max(0.0, hi - lo)
  return overlap / min(a.extent, b.extent) ** 2


_ALL_PAIRS = tuple((c, s) for s in vocab.SHAPES for c in vocab.COLOURS)
_SEEN_PAIRS = tuple(pair for pair in _ALL_PAIRS if not vocab.is_withheld(*pair))


def _allowed_pairs(split: str, main_object: bool) -> tuple[tuple[str, str], ...]:
  if split == "test":
    # Only the main object must be novel; the others may be anything.
    return vocab.WITHHELD_PAIRS if main_object else _ALL_PAIRS
  return _SEEN_PAIRS


def sample_scene(
    rng: np.random.Generator, split: str, max_objects: int = MAX_OBJECTS
) -> tuple[list[SceneObject], Background]:
  """Draws 1 to ``max_objects`` objects (distinct colour-shape pairs) and a background."""
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")
  check_max_objects(max_objects)
  objects: list[SceneObject] = []
  for i in range(int(rng.integers(1, max_objects + 1))):
    used = {(o.colour, o.shape) for o in objects}
    pairs = [p for p in _allowed_pairs(split, main_object=i == 0) if p not in used]
    colour, shape = pairs[rng.integers(len(pairs))]
    size = vocab.SIZE_NAMES[rng.integers(len(vocab.SIZE_NAMES))]
    half = vocab.SIZES[size] / 2
    for _ in range(_PLACEMENT_TRIES):
      center_y, center_x = rng.uniform(half, 1 - half, size=2)
      candidate = SceneObject(shape, colour, size, (float(center_y), float(center_x)))
      if all(_overlap_fraction(candidate, o) <= _MAX_OVERLAP for o in objects):
        objects.append(candidate)
        break
    # An object that finds no room is left out; the scene stays valid.
  return objects, _sample_background(rng)


def sample_single_object(
    rng: np.random.Generator, colour: str, shape: str, size: str | None = None
) -> tuple[list[SceneObject], Background]:
  """One object of the given kind (random size unless given) at a random place.

  For classifier training data and single-object test images.
  """
  vocab.class_label(colour, shape)  # validates both names
  if size is None:
    size = vocab.SIZE_NAMES[rng.integers(len(vocab.SIZE_NAMES))]
  half = vocab.SIZES[size] / 2
  center_y, center_x = rng.uniform(half, 1 - half, size=2)
  return [SceneObject(shape, colour, size, (float(center_y), float(center_x)))], _sample_background(rng)


def _sample_background(rng: np.random.Generator) -> Background:
  names = list(vocab.BACKGROUND_TONES)
  if rng.random() < 0.5:
    return Background(tones=(names[rng.integers(len(names))],))
  first, second = rng.choice(len(names), size=2, replace=False)
  return Background(
      tones=(names[first], names[second]),
      split=("horizontal", "vertical")[rng.integers(2)],
      split_at=float(rng.uniform(0.3, 0.7)),
  )
