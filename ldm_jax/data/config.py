"""``config.data``: where images come from and how they are prepared.

The global batch size is not here: it belongs to ``config.train`` and is
passed to ``make_iterator`` as an argument.
"""

from __future__ import annotations

import ml_collections

SOURCES = ("shapes", "tfds", "array_record", "folder", "webdataset", "latents")
MISSING_CAPTION_POLICIES = ("empty", "skip")


def default_data_config() -> ml_collections.ConfigDict:
  """Every data field with its default; experiment configs override some."""
  config = ml_collections.ConfigDict()
  # "shapes": the built-in captioned-shapes dataset (built on first use);
  # "tfds": a prepared TFDS dataset read with tfds.data_source (ArrayRecord);
  # "array_record": shards written by `python -m ldm_jax.data.prepare`;
  # "folder": a folder of images with optional same-name .txt captions;
  # "webdataset": tar shards as img2dataset writes them (data.path: a brace pattern, glob or folder);
  # "latents": shards written by precompute_latents.py (data.path: their folder).
  config.source = "shapes"
  # TFDS dataset name for source "tfds", e.g. "imagenet2012", "celeb_a_hq/256".
  config.name = ""
  # TFDS data directory ("shapes" and "tfds"); "" means TFDS's default
  # ($TFDS_DATA_DIR or ~/tensorflow_datasets).
  config.data_dir = ""
  # "folder": the image folder; "array_record": a glob of shards or a folder
  # holding them. "{split}" is replaced by the split's name.
  config.path = ""
  config.train_split = "train"
  config.eval_split = "validation"
  # Images are resized (shorter side, antialiased) and cropped to this square.
  config.image_size = 64
  config.crop = "center"  # "center" | "random"
  # Random horizontal flips. Off by default: flipping swaps "left" and "right",
  # which would contradict spatial captions such as the shapes dataset's.
  config.random_flip = False
  # Field names for source "tfds"; "/" reaches into nested features
  # ("captions/text"). Empty caption_key / label_key: the field is not read.
  config.image_key = "image"
  config.caption_key = ""
  config.label_key = ""
  # Decoding worker processes (0: decode in the main process) and reader
  # threads per process.
  config.num_workers = 0
  config.num_threads = 4
  # Unreadable records (and uncaptioned ones under missing_caption="skip") are
  # skipped and counted (data/skipped in metrics.jsonl), but when more than this
  # fraction of the last 200 records read is skipped, the run stops with an error
  # naming some of them. 1 disables the check.
  config.max_skip_fraction = 0.5
  # An image without a caption file (source "folder" or "array_record"):
  # "empty" trains it with the empty caption (the null caption of guidance);
  # "skip" leaves it out. Either way it is counted (data/missing_captions).
  config.missing_caption = "empty"

  config.tokenizer = ml_collections.ConfigDict()
  # "" (no tokens), "clip", "bert", or "shapes" (word-level, built from the
  # shapes dataset's caption words; needs no files).
  config.tokenizer.kind = ""
  # Folder holding the tokenizer files ("clip", "bert"; optional for "shapes").
  config.tokenizer.path = ""
  config.tokenizer.max_length = 77

  config.shapes = ml_collections.ConfigDict()
  # Split sizes of the built-in dataset; -1 keeps the default for the image
  # size (10k/1k/1k at 32 and 64 px, fewer at 128 and 256 px).
  config.shapes.num_train = -1
  config.shapes.num_validation = -1
  config.shapes.num_test = -1
  config.shapes.seed = 0
  # Scenes hold 1 to `max_objects` objects (at most 3); 1 gives single-object
  # scenes only (their own dataset folder).
  config.shapes.max_objects = 3

  # Inputs of the conditional tasks made on the host (docs/conditional-data.md).
  config.conditioning = ml_collections.ConfigDict()
  # Super-resolution's low-res input (batch field "low_res", float32 [-1, 1]):
  # "device_bicubic": none here, the train step resizes the image (cubic, not
  # antialiased); "bicubic": Pillow's antialiased bicubic; "bsr": the paper's
  # LDM-BSR degradation (blur, resize, noise, JPEG in random order).
  config.conditioning.low_res = "device_bicubic"
  # The low-res side is image_size / low_res_factor ("bicubic", "bsr"); it must
  # equal the model's low-res size (concat.low_res_size, else the latent side).
  config.conditioning.low_res_factor = 4
  # Inpainting masks (batch field "mask", (H, W, 1), 1 = hole): "device_rectangles":
  # none here, the train step draws rectangles; "rectangles": the same on the
  # host; "lama": LaMa's strokes and boxes (lama_preset).
  config.conditioning.masks = "device_rectangles"
  # LaMa's settings for masks="lama": "train" (its training mix), or its evaluation
  # sets "thick", "medium", "thin" (256 px) and "thick_512", "medium_512", "thin_512".
  config.conditioning.lama_preset = "train"
  # Layouts (the layout cond stage): N > 0 gives every example N objects (boxes,
  # box_labels, num_objects; extra objects dropped, padding label -1), read from
  # name.json beside each image (source "folder") or the two keys below (source
  # "tfds"); 0 reads none (the shapes dataset keeps its own 3).
  config.conditioning.layout_max_objects = 0
  config.conditioning.layout_boxes_key = "objects/bbox"  # TFDS's (ymin, xmin, ymax, xmax), normalised
  config.conditioning.layout_labels_key = "objects/label"
  # Semantic synthesis, source "folder": a folder mirroring data.path in which
  # <relative path without extension>.png is each image's label map ("{split}"
  # is replaced); "" reads none.
  config.conditioning.segmentation_folder = ""
  # Classes of the label maps: a record holding a value >= it is skipped with an
  # error naming its file (counted in data/skipped). 0: not checked.
  config.conditioning.num_seg_classes = 0

  # Source "webdataset": tar shards as img2dataset writes them (000123.jpg +
  # 000123.txt caption and/or 000123.json metadata), named by data.path: a brace
  # pattern ('shards/{00000..00127}.tar'), a glob, or a folder of .tar files.
  config.webdataset = ml_collections.ConfigDict()
  # Drop images whose shorter side is below this many pixels (0: keep all); the
  # .json's original size decides when it has one, else the image's own size.
  # Dropped images are counted at start (a log line), not as data/skipped.
  config.webdataset.min_size = 0
  # Drop images whose long side exceeds this multiple of the short side
  # (0: keep all); e.g. 2.0 keeps 1:2 panoramas but not 1:3.
  config.webdataset.max_aspect_ratio = 0.0
  return config


def validate_image_size(image_size: int, multiple: int = 1) -> int:
  """Checks that ``image_size`` is a positive multiple of ``multiple``.

  A model that downsamples by ``multiple`` in total (e.g. autoencoder factor
  8 times a UNet with three downsamplings: 64) can only take such sizes.
  """
  if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
    raise ValueError(f"image_size must be a positive integer, got {image_size!r}.")
  if multiple < 1:
    raise ValueError(f"multiple must be a positive integer, got {multiple!r}.")
  if image_size % multiple:
    lower = max(multiple, image_size // multiple * multiple)
    raise ValueError(
        f"image_size {image_size} is not a multiple of {multiple}, which the model "
        f"needs (it downsamples by {multiple} in total); try {lower} or {lower + multiple}."
    )
  return image_size
