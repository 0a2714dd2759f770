"""Where evaluated images come from: a dataset split, a folder, or a sampler.

Every source yields batches of images (uint8 or [-1, 1] floats, NHWC) that
a feature network takes directly; the split also gives its captions and
labels, which become the conditions of generated samples. Single-process.
"""

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from ldm_jax.data import make_iterator
from ldm_jax.data.folder_source import list_images, read_caption
from ldm_jax.data.image_io import save_png
from ldm_jax.data.images import decode_image
from ldm_jax.data.transforms import Geometry
from ldm_jax.evaluation.features import iterate_features


def split_batches(
    data_config: ml_collections.ConfigDict, split: str, *, batch_size: int, num: int = -1
) -> Iterator[dict[str, np.ndarray]]:
  """The first ``num`` examples of ``split`` (all of it for -1), in order, once.

  Images stay at ``data_config.image_size``; no tokenizer is loaded (captions
  come back as strings).
  """

  config = ml_collections.ConfigDict(data_config.to_dict())
  config.tokenizer.kind = ""  # captions only: evaluation never needs tokens here
  config.random_flip = False
  config.crop = "center"
  iterator = make_iterator(config, split, global_batch_size=batch_size, seed=0, process_index=0, process_count=1,
                           shuffle=False, num_epochs=1, drop_remainder=False)
  seen = 0
  for batch in iterator:
    if num >= 0:
      batch = {k: v[: num - seen] for k, v in batch.items()}
    n = len(batch["image"])
    if n == 0:
      return
    yield batch
    seen += n
    if 0 <= num <= seen:
      return


@dataclasses.dataclass
class SplitScan:
  """Features (or None) and conditions of the images of a split."""

  features: dict[str, np.ndarray] | None
  captions: list[str]
  labels: list[int]
  count: int


def scan_split(batches: Iterable[dict[str, np.ndarray]], extract: Callable | None = None) -> SplitScan:
  """One pass over ``split_batches``: features of the images (with ``extract``), captions and labels."""
  pieces, captions, labels, count = [], [], [], 0
  for batch in batches:
    if extract is not None:
      pieces.append(extract(batch["image"]))
    captions += [str(c) for c in batch.get("caption", [])]
    labels += [int(x) for x in batch.get("label", [])]
    count += len(batch["image"])
  if count == 0:
    raise ValueError("the reference split holds no images")
  features = jax.tree.map(lambda *xs: np.concatenate(xs), *pieces) if pieces else None
  return SplitScan(features, captions, labels, count)


def folder_batches(root: str, *, size: int, batch_size: int) -> Iterator[tuple[np.ndarray, list[str]]]:
  """``(uint8 images, captions)`` of every image under ``root`` (sorted), resized
  (shorter side) and centre-cropped to ``size``; captions from same-name ``.txt`` files.

  An unreadable image is skipped with a warning naming it; a folder in which
  none can be read is an error naming the first few.
  """
  paths = list_images(root)  # fails clearly on a missing or image-less folder
  geometry = Geometry(size, "center")
  readable, unreadable = 0, []
  images, captions = [], []
  for rel in paths:
    path = os.path.join(root, rel)
    try:
      with open(path, "rb") as f:
        image = decode_image(f.read())
    except (OSError, ValueError) as e:  # UnreadableImageError is a ValueError
      logging.warning("skipping unreadable image %s: %s", path, e)
      unreadable.append(rel)
      continue
    readable += 1
    images.append(geometry({"image": image}, np.random.default_rng(0))["image"])
    captions.append(read_caption(path))
    if len(images) == batch_size:
      yield np.stack(images), captions
      images, captions = [], []
  if images:
    yield np.stack(images), captions
  if not readable:
    raise ValueError(f"none of the {len(paths)} images under {root!r} could be read, e.g. {unreadable[:3]}")
  if unreadable:
    logging.warning("%d of %d images under %s could not be read and were left out", len(unreadable), len(paths), root)


def first_image_size(root: str) -> int:
  """The shorter side of the first image under ``root``."""
  from PIL import Image

  with Image.open(os.path.join(root, list_images(root)[0])) as image:
    return min(image.size)


def conditions_for(kind: str | None, num: int, *, captions: list[str] = (), labels: list[int] = (),
                   prompts: list[str] = (), num_classes: int = 0, classes: str = "split") -> list[Any] | None:
  """``num`` conditions: prompts (``"text"``), labels (``"label"``) or None (unconditional).

  Prompts come from ``prompts`` (a file) or the split's ``captions``; labels
  from the split (``classes="split"``) or every class in turn
  (``"balanced"``). Lists shorter than ``num`` are cycled.
  """
  if kind is None:
    return None
  if kind == "tokens":
    pool = list(prompts) or list(captions)
    what = "prompts (--prompts_file) or captions in the reference split"
  elif kind == "label":
    if classes == "balanced":
      if num_classes <= 0:
        raise ValueError("classes='balanced' needs the number of classes (--num_classes)")
      pool = list(range(num_classes))
    elif classes == "split":
      pool = list(labels)
    else:
      raise ValueError(f"classes must be 'split' or 'balanced', got {classes!r}")
    what = "labels in the reference split (or --classes=balanced)"
  else:
    raise ValueError(f"sampling for evaluation supports text, class and unconditional models, not {kind!r} "
                     "conditioning: sample with sample.py and evaluate the folder with --images_dir")
  if not pool:
    raise ValueError(f"the model is conditional but there are no {what}")
  return [pool[i % len(pool)] for i in range(num)]


def sample_batches(
    pipeline, conditions: list[Any] | None, *, num: int, batch_size: int, sampler, guidance_scale: float,
    eta: float, seed: int,
) -> Iterator[np.ndarray]:
  """uint8 samples in batches of ``batch_size``; image ``i`` has seed ``(seed, i)``.

  The last batch is padded with repeats to the full size, so one compiled
  program serves every batch, and trimmed.
  """
  for start in range(0, num, batch_size):
    n = min(batch_size, num - start)
    kw = dict(sampler=sampler, guidance_scale=guidance_scale, eta=eta, seed=seed, first_index=start)
    if conditions is None:
      images = pipeline.generate({}, num=batch_size, **kw)
    else:
      chunk = conditions[start: start + n]
      chunk = chunk + [chunk[-1]] * (batch_size - n)
      if isinstance(chunk[0], str):
        images = pipeline.text_to_image(chunk, **kw)
      else:
        images = pipeline.class_to_image(chunk, **kw)
    yield images[:n]


def saving(batches: Iterable[np.ndarray], directory: str, conditions: list[Any] | None) -> Iterator[np.ndarray]:
  """Passes uint8 batches through, writing ``directory/00000.png``, ... and
  ``conditions.txt`` (one condition per line, in image order) on the way."""

  os.makedirs(directory, exist_ok=True)
  index = 0
  for batch in batches:
    for image in batch:
      save_png(os.path.join(directory, f"{index:05d}.png"), image)
      index += 1
    yield batch
  if conditions is not None:
    with open(os.path.join(directory, "conditions.txt"), "w") as f:
      f.writelines(f"{c}\n" for c in conditions[:index])


def extract_all(extract: Callable, batches: Iterable[np.ndarray]) -> dict[str, np.ndarray]:
  """Concatenated features of image batches."""
  pieces = list(iterate_features(extract, batches))
  if not pieces:
    raise ValueError("no images to extract features from")
  return jax.tree.map(lambda *xs: np.concatenate(xs), *pieces)
