"""The ``captioned_shapes`` TFDS builder: generated locally, no download.

Stored as ArrayRecord with ``features.Tensor``/``Text`` only, so both
building and reading (``tfds.data_source`` / ``builder.as_data_source``)
work without TensorFlow. Every example is a pure function of
``(seed, split, index)``, so a build is reproducible byte for byte.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from ldm_jax.data.captioned_shapes import scene as scene_lib
from ldm_jax.data.captioned_shapes.render import render_scene

IMAGE_SIZES = (64, 32, 128, 256)  # 64 is the default config
_SPLIT_IDS = {split: i for i, split in enumerate(scene_lib.SPLITS)}
# Small enough to build in seconds (64 px: about 15 s of one CPU core).
DEFAULT_SPLIT_SIZES = {
    32: (10_000, 1_000, 1_000),
    64: (10_000, 1_000, 1_000),
    128: (5_000, 500, 500),
    256: (2_000, 200, 200),
}


@dataclasses.dataclass(eq=False)  # like tfds.core.BuilderConfig itself
class CaptionedShapesConfig(tfds.core.BuilderConfig):
  image_size: int = 64
  num_train: int = 10_000
  num_validation: int = 1_000
  num_test: int = 1_000
  seed: int = 0
  max_objects: int = scene_lib.MAX_OBJECTS

  @property
  def split_sizes(self) -> dict[str, int]:
    return {"train": self.num_train, "validation": self.num_validation, "test": self.num_test}


def make_config(
    image_size: int = 64,
    num_train: int | None = None,
    num_validation: int | None = None,
    num_test: int | None = None,
    seed: int = 0,
    max_objects: int = scene_lib.MAX_OBJECTS,
) -> CaptionedShapesConfig:
  """Builder config; non-default sizes or seeds get their own config name.

  The name is the folder the data lives in, so a dataset built with other
  settings never shadows (or is mistaken for) the default one.
  """
  if image_size not in DEFAULT_SPLIT_SIZES:
    raise ValueError(
        f"captioned_shapes is built at image sizes {sorted(DEFAULT_SPLIT_SIZES)}, "
        f"not {image_size}; pick one of them."
    )
  defaults = DEFAULT_SPLIT_SIZES[image_size]
  sizes = tuple(d if n is None else int(n) for n, d in zip((num_train, num_validation, num_test), defaults))
  if min(sizes) < 1:
    raise ValueError(f"Every split needs at least one example, got train/validation/test = {sizes}.")
  scene_lib.check_max_objects(max_objects)
  name = f"{image_size}px"
  if sizes != defaults or seed != 0:
    name += f"_train{sizes[0]}_val{sizes[1]}_test{sizes[2]}_seed{seed}"
  if max_objects != scene_lib.MAX_OBJECTS:
    name += f"_max{max_objects}objects"
  return CaptionedShapesConfig(
      name=name,
      description=(f"{image_size}x{image_size} images; train/validation/test = {sizes}; seed {seed}; "
                   f"1-{max_objects} objects per scene."),
      image_size=image_size,
      num_train=sizes[0],
      num_validation=sizes[1],
      num_test=sizes[2],
      seed=seed,
      max_objects=max_objects,
  )


class CaptionedShapes(tfds.core.GeneratorBasedBuilder):
  """1-3 coloured shapes on neutral backgrounds, with captions, boxes, masks."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [make_config(size) for size in IMAGE_SIZES]

  # tfds 4.9 resolves `code_path` through the `importlib_resources` backport,
  # which is only installed on Python < 3.9; this module's file is the answer.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(os.path.abspath(__file__))

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    max_objects = scene_lib.MAX_OBJECTS
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(
                shape=(size, size, 3), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB
            ),
            # 0 = background, class label + 1 where an object is visible.
            "segmentation": tfds.features.Tensor(
                shape=(size, size), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB
            ),
            "caption": tfds.features.Text(),
            # Class of the main (first-mentioned) object.
            "label": tfds.features.Tensor(shape=(), dtype=np.int32),
            "num_objects": tfds.features.Tensor(shape=(), dtype=np.int32),
            # Padded to MAX_OBJECTS: boxes are zeros and labels -1 past num_objects.
            # Boxes are normalised (ymin, xmin, ymax, xmax), y down.
            "objects": tfds.features.FeaturesDict({
                "bbox": tfds.features.Tensor(shape=(max_objects, 4), dtype=np.float32),
                "label": tfds.features.Tensor(shape=(max_objects,), dtype=np.int32),
            }),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {
        split: self._generate_examples(split, count)
        for split, count in self.builder_config.split_sizes.items()
    }

  def _generate_examples(self, split: str, count: int):
    for index in range(count):
      yield index, make_example(split, index, self.builder_config.image_size, self.builder_config.seed,
                                self.builder_config.max_objects)


def make_example(split: str, index: int, image_size: int, seed: int,
                 max_objects: int = scene_lib.MAX_OBJECTS) -> dict:
  """Example ``index`` of ``split``: a pure function of its arguments."""
  rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
  objects, background = scene_lib.sample_scene(rng, split, max_objects)
  rendered = render_scene(objects, image_size, background, rng)
  boxes = np.zeros((scene_lib.MAX_OBJECTS, 4), np.float32)
  labels = np.full((scene_lib.MAX_OBJECTS,), -1, np.int32)
  boxes[: len(objects)] = rendered.boxes
  labels[: len(objects)] = [o.label for o in objects]
  return {
      "image": rendered.image,
      "segmentation": rendered.segmentation,
      "caption": scene_lib.caption(objects),
      "label": np.int32(objects[0].label),
      "num_objects": np.int32(len(objects)),
      "objects": {"bbox": boxes, "label": labels},
  }


def build_captioned_shapes(
    data_dir: str | os.PathLike | None = None,
    image_size: int = 64,
    num_train: int | None = None,
    num_validation: int | None = None,
    num_test: int | None = None,
    seed: int = 0,
    max_objects: int = scene_lib.MAX_OBJECTS,
) -> CaptionedShapes:
  """Returns the builder, generating the dataset first if it is missing.

  Idempotent: a second call finds the data and does nothing. ``data_dir``
  defaults to TFDS's (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
  """
  config = make_config(image_size, num_train, num_validation, num_test, seed, max_objects)
  # A registered config must be named; only custom ones are passed whole.
  registered = config.name in CaptionedShapes.builder_configs
  builder = CaptionedShapes(
      data_dir=data_dir, config=config.name if registered else config, file_format="array_record"
  )
  if not builder.is_prepared():
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )
  return builder
