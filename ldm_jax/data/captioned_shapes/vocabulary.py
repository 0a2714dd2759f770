"""The closed world of the captioned-shapes dataset: shapes, colours, sizes.

Class labels combine a shape and a colour:
``label = shape_index * len(COLOURS) + colour_index`` (36 classes).

``WITHHELD_PAIRS`` are colour-shape combinations that never occur in the
train or validation splits; every test example's main (first-mentioned)
object has one of them. They form a permutation (each colour and each shape
is withheld exactly once), so every colour and every shape is still seen in
training with five other partners.
"""

from __future__ import annotations

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "diamond")

# Saturated, well-separated colours (pairwise RGB distance >= 100). Background
# tones (below) are neutral so they can never be mistaken for a shape colour.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 20, 30),
    "green": (30, 160, 40),
    "blue": (30, 70, 220),
    "yellow": (245, 225, 20),
    "purple": (140, 50, 190),
    "orange": (250, 125, 10),
}

# Side of an object's bounding square as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.25, "large": 0.42}

BACKGROUND_TONES: dict[str, tuple[int, int, int]] = {
    "white": (235, 235, 235),
    "light grey": (185, 185, 185),
    "grey": (128, 128, 128),
    "dark grey": (72, 72, 72),
    "black": (22, 22, 22),
    "beige": (215, 205, 185),
}

WITHHELD_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("green", "star"),
    ("blue", "hexagon"),
    ("yellow", "circle"),
    ("purple", "square"),
    ("orange", "diamond"),
)

COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SIZE_NAMES: tuple[str, ...] = tuple(SIZES)
NUM_CLASSES: int = len(SHAPES) * len(COLOURS)

# Words that spatial relations use in captions ("to the left of", "above", ...).
RELATION_WORDS: tuple[str, ...] = ("to", "the", "left", "right", "of", "above", "below")


def class_label(colour: str, shape: str) -> int:
  """Class index of a colour-shape pair."""
  if colour not in COLOURS:
    raise ValueError(f"Unknown colour {colour!r}; expected one of {COLOUR_NAMES}.")
  if shape not in SHAPES:
    raise ValueError(f"Unknown shape {shape!r}; expected one of {SHAPES}.")
  return SHAPES.index(shape) * len(COLOURS) + COLOUR_NAMES.index(colour)


def class_pair(label: int) -> tuple[str, str]:
  """(colour, shape) of a class index."""
  if not 0 <= label < NUM_CLASSES:
    raise ValueError(f"Class label {label} is outside [0, {NUM_CLASSES}).")
  shape_index, colour_index = divmod(int(label), len(COLOURS))
  return COLOUR_NAMES[colour_index], SHAPES[shape_index]


def class_name(label: int) -> str:
  """Human-readable name of a class index, e.g. ``"red circle"``."""
  return " ".join(class_pair(label))


def is_withheld(colour: str, shape: str) -> bool:
  return (colour, shape) in WITHHELD_PAIRS


def single_object_prompt(colour: str, shape: str, size: str | None = None) -> str:
  """Caption of a one-object scene, worded exactly as the dataset words it."""
  class_label(colour, shape)  # validates both names
  if size is None:
    return f"a {colour} {shape}"
  if size not in SIZES:
    raise ValueError(f"Unknown size {size!r}; expected one of {tuple(SIZES)}.")
  return f"a {size} {colour} {shape}"


def held_out_prompts(with_sizes: bool = True) -> list[tuple[str, int]]:
  """(prompt, class label) for every withheld colour-shape pair.

  With ``with_sizes`` each pair appears once per size ("a small red
  triangle", "a large red triangle"), as in the dataset's captions.
  """
  sizes = tuple(SIZES) if with_sizes else (None,)
  return [
      (single_object_prompt(colour, shape, size), class_label(colour, shape))
      for colour, shape in WITHHELD_PAIRS
      for size in sizes
  ]


def caption_words() -> list[str]:
  """Every word (and punctuation mark) a caption can contain, sorted."""
  words = {"a", "and", ","} | set(RELATION_WORDS) | set(SIZES) | set(SHAPES)
  for colour in COLOURS:
    words.update(colour.split())
  return sorted(words)
