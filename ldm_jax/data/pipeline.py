"""``make_iterator``: the configured dataset as a checkpointable stream of batches.

Built on grain's ``MapDataset``: a random-access index space is what makes
shuffling global, per-process slicing exact, per-example randomness a pure
function of (seed, position), and resuming exact -- all without a
TensorFlow runtime. The order of operations:

  source -> shuffle (fresh order each epoch) -> repeat -> decode + transform
  (random_map) -> this process's slice -> [worker processes] -> skip bad
  records, batch, tokenise (``InputIterator``, main process)

Source "latents" (precomputed by ``precompute_latents.py``) takes the same
path with ``LatentExample`` in place of the image transform: batches carry
``latent_mean`` [``latent_logvar``] [``context``] and the conditioning fields,
no ``image``.
"""

from __future__ import annotations

import grain
import jax
import ml_collections
from absl import flags

from ldm_jax.data.batching import InputIterator
from ldm_jax.data.config import MISSING_CAPTION_POLICIES, validate_image_size
from ldm_jax.data.degradation import LOW_RES_KINDS, LowRes
from ldm_jax.data.folder_source import ImageFolderSource
from ldm_jax.data.inpaint_masks import LAMA_PRESETS, MASK_KINDS, MaskGenerator
from ldm_jax.data.latent_records import LatentExample
from ldm_jax.data.preprocess import Preprocess
from ldm_jax.data.sharding import ProcessSlice
from ldm_jax.data.skipping import SafeRead
from ldm_jax.data.sources import has_captions, open_source
from ldm_jax.data.tfds_source import TfdsSource
from ldm_jax.data.tokenizers import load_tokenizer
from ldm_jax.data.transforms import Geometry

# Elements each worker process keeps ready; a few per worker hides latency.
_PER_WORKER_BUFFER = 8


def make_iterator(
    data_config: ml_collections.ConfigDict,
    split: str,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    shuffle: bool = True,
    num_epochs: int | None = None,
    tokenizer=None,
    drop_remainder: bool = True,
) -> InputIterator:
  """Batches of ``split`` for this process (global batch / process count each).

  ``num_epochs=None`` repeats forever. ``tokenizer`` defaults to the one
  ``data_config.tokenizer`` names (none when its ``kind`` is empty).
  Everything that can be checked is checked here, before the first batch.
  """
  validate_image_size(data_config.image_size)
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed must be in [0, 2**32), got {seed}.")
  # .get: configs saved by runs older than these keys lack them.
  missing_caption = data_config.get("missing_caption", "empty")
  if missing_caption not in MISSING_CAPTION_POLICIES:
    raise ValueError(f"data.missing_caption must be one of {MISSING_CAPTION_POLICIES}, got {missing_caption!r}.")
  max_skip_fraction = data_config.get("max_skip_fraction", 0.5)
  if not 0 <= max_skip_fraction <= 1:
    raise ValueError(f"data.max_skip_fraction must be in [0, 1], got {max_skip_fraction!r}.")
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  geometry = Geometry(data_config.image_size, data_config.crop, data_config.random_flip)
  if tokenizer is None:
    tokenizer = load_tokenizer(data_config.tokenizer)
  if tokenizer is not None and not has_captions(data_config, split):
    if data_config.source == "latents":
      raise ValueError(f"A tokenizer is configured but the latents in {data_config.path!r} (split {split!r}) hold "
                       "no captions: precompute them from a captioned dataset.")
    raise ValueError("A tokenizer is configured but the dataset has no captions: set config.data.caption_key.")

  conditioning = conditioning_config(data_config)
  latents = data_config.source == "latents"
  if latents:  # precomputed: no image to decode, crop or degrade
    check_latents_config(data_config, conditioning)
    transform, source = LatentExample(), open_source(data_config, split)
  else:
    transform = Preprocess(geometry, missing_caption, **conditional_transforms(conditioning, data_config.image_size))
    source = open_conditional_source(data_config, split, conditioning)
  if len(source) == 0:
    raise ValueError(f"Split {split!r} of {source!r} is empty.")
  dataset = grain.MapDataset.source(SafeRead(source))
  if shuffle:
    dataset = dataset.shuffle(seed=seed)  # Reshuffles each epoch (seed + epoch).
  dataset = dataset.repeat(num_epochs)
  dataset = dataset.random_map(transform, seed=seed)
  dataset = ProcessSlice(dataset, global_batch_size, process_index, process_count)
  elements = dataset.to_iter_dataset(grain.ReadOptions(num_threads=data_config.num_threads))
  if data_config.num_workers > 0:
    # grain's worker processes read absl flags; outside absl.app.run nobody parsed them.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    elements = elements.mp_prefetch(
        grain.MultiprocessingOptions(
            num_workers=data_config.num_workers, per_worker_buffer_size=_PER_WORKER_BUFFER
        )
    )
  return InputIterator(
      iter(elements),
      batch_size=global_batch_size // process_count,
      drop_remainder=drop_remainder,
      tokenizer=tokenizer,
      max_length=data_config.tokenizer.max_length,
      max_skip_fraction=max_skip_fraction,
  )


def check_latents_config(data_config: ml_collections.ConfigDict, conditioning: ml_collections.ConfigDict) -> None:
  """Source "latents" holds one fixed view of each image: refuse settings that need the pixels."""
  if data_config.random_flip or data_config.crop != "center":
    raise ValueError("data.source='latents' holds one center-cropped, unflipped view of each image: set "
                     "data.crop='center' and data.random_flip=False (or train from the images)")
  # Layouts and labels are stored in the records; these are made from (or move with) the pixels.
  needs_pixels = {k: conditioning[k] for k in ("low_res", "masks", "segmentation_folder")
                  if conditioning[k] != _CONDITIONING_DEFAULTS[k]}
  if needs_pixels:
    key = next(iter(needs_pixels))
    raise ValueError(f"data.conditioning.{key}={needs_pixels[key]!r} is made from the images, which "
                     "data.source='latents' does not hold: leave data.conditioning at its defaults")


def conditioning_config(data_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``data.conditioning`` with every key (configs saved before the section existed lack some)."""
  given = data_config.get("conditioning") or {}
  given = given.to_dict() if isinstance(given, ml_collections.ConfigDict) else dict(given)
  return ml_collections.ConfigDict({**_CONDITIONING_DEFAULTS, **given})


# The defaults: today's behaviour (everything made on device, no layouts or label maps read).
_CONDITIONING_DEFAULTS = dict(low_res="device_bicubic", low_res_factor=4, masks="device_rectangles",
                              lama_preset="train", layout_max_objects=0, layout_boxes_key="objects/bbox",
                              layout_labels_key="objects/label", segmentation_folder="", num_seg_classes=0)


def conditional_transforms(conditioning: ml_collections.ConfigDict, image_size: int) -> dict:
  """``Preprocess``'s conditional fields from ``data.conditioning``; bad values fail here, naming the key."""
  c = conditioning
  if c.low_res not in LOW_RES_KINDS:
    raise ValueError(f"data.conditioning.low_res must be one of {LOW_RES_KINDS}, got {c.low_res!r}.")
  if c.masks not in MASK_KINDS:
    raise ValueError(f"data.conditioning.masks must be one of {MASK_KINDS}, got {c.masks!r}.")
  if c.masks == "lama" and c.lama_preset not in LAMA_PRESETS:
    raise ValueError(f"data.conditioning.lama_preset must be one of {sorted(LAMA_PRESETS)}, got {c.lama_preset!r}.")
  low_res = None
  if c.low_res != "device_bicubic":
    factor = c.low_res_factor
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1 or image_size % factor:
      raise ValueError(f"data.conditioning.low_res_factor must be a positive integer dividing data.image_size "
                       f"{image_size}, got {factor!r}.")
    low_res = LowRes(c.low_res, factor)
  layout_max_objects = c.layout_max_objects
  if isinstance(layout_max_objects, bool) or not isinstance(layout_max_objects, int) or layout_max_objects < 0:
    raise ValueError(f"data.conditioning.layout_max_objects must be an integer >= 0, got {layout_max_objects!r}.")
  if not isinstance(c.num_seg_classes, int) or c.num_seg_classes < 0:
    raise ValueError(f"data.conditioning.num_seg_classes must be an integer >= 0, got {c.num_seg_classes!r}.")
  return dict(low_res=low_res, masks=None if c.masks == "device_rectangles" else MaskGenerator(c.masks, c.lama_preset),
              layout_max_objects=layout_max_objects, num_seg_classes=c.num_seg_classes)


def open_conditional_source(data_config: ml_collections.ConfigDict, split: str,
                            conditioning: ml_collections.ConfigDict):
  """The configured source, reading label maps and layouts when ``data.conditioning`` asks for them."""
  source = open_source(data_config, split)
  read_layout = conditioning.layout_max_objects > 0
  if conditioning.segmentation_folder and not isinstance(source, ImageFolderSource):
    raise ValueError(f"data.conditioning.segmentation_folder needs source 'folder', not {data_config.source!r} "
                     "(TFDS datasets name their label-map field themselves).")
  if isinstance(source, ImageFolderSource) and (conditioning.segmentation_folder or read_layout):
    segmentation_root = conditioning.segmentation_folder.replace("{split}", split) or None
    return source.with_conditions(segmentation_root, read_layout)
  if read_layout and data_config.source == "tfds" and isinstance(source, TfdsSource):
    if not (conditioning.layout_boxes_key and conditioning.layout_labels_key):
      raise ValueError("data.conditioning.layout_boxes_key and layout_labels_key must name the TFDS fields of the "
                       "boxes and labels (e.g. 'objects/bbox', 'objects/label').")
    # A fresh source of our own: read the layout fields too (see docs/conditional-data.md).
    source.fields.update(boxes=conditioning.layout_boxes_key, box_labels=conditioning.layout_labels_key)
  elif read_layout and data_config.source not in ("shapes", "tfds", "folder"):
    raise ValueError(f"data.conditioning.layout_max_objects > 0 needs source 'folder', 'tfds' or 'shapes', "
                     f"not {data_config.source!r}.")
  return source
