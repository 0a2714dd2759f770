"""Geometry (resize / crop / flip) keeps image, segmentation and boxes together."""

import numpy as np
import pytest
from PIL import Image

from ldm_jax.data.config import validate_image_size
from ldm_jax.data.preprocess import Preprocess
from ldm_jax.data.transforms import Geometry


def _example():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
  segmentation = np.zeros((40, 60), np.uint8)
  segmentation[10:30, 20:50] = 6
  boxes = np.zeros((3, 4), np.float32)
  boxes[0] = (10 / 40, 20 / 60, 30 / 40, 50 / 60)
  return {"image": image, "segmentation": segmentation, "boxes": boxes, "num_objects": np.int32(1)}


def _pixel_box(mask):
  rows, cols = np.nonzero(mask)
  return np.array([rows.min(), cols.min(), rows.max() + 1, cols.max() + 1], np.float32) / mask.shape[0]


@pytest.mark.parametrize("seed", range(6))
def test_random_crop_and_flip_move_image_segmentation_and_boxes_together(seed):
  example = _example()
  out = Geometry(image_size=20, crop="random", random_flip=True)(example, np.random.default_rng(seed))
  # Independent replay: shorter side 40 -> 20 gives 20 x 30; the same draws pick the window.
  draws = np.random.default_rng(seed)
  top, left = draws.integers(0, 1), draws.integers(0, 11)
  flip = draws.random() < 0.5
  resized = np.asarray(Image.fromarray(example["image"]).resize((30, 20), Image.Resampling.BICUBIC))
  expected = resized[top : top + 20, left : left + 20]
  np.testing.assert_array_equal(out["image"], expected[:, ::-1] if flip else expected)
  seg = np.asarray(Image.fromarray(example["segmentation"]).resize((30, 20), Image.Resampling.NEAREST))
  seg = seg[top : top + 20, left : left + 20]
  np.testing.assert_array_equal(out["segmentation"], seg[:, ::-1] if flip else seg)
  # The moved box is the box of the moved object's pixels.
  np.testing.assert_allclose(out["boxes"][0], _pixel_box(out["segmentation"] == 6), atol=1.01 / 20)
  np.testing.assert_array_equal(out["boxes"][1:], 0)  # padding stays padding


def test_same_rng_same_result_and_crops_vary():
  geometry = Geometry(image_size=20, crop="random", random_flip=True)
  a = geometry(_example(), np.random.default_rng(3))
  b = geometry(_example(), np.random.default_rng(3))
  np.testing.assert_array_equal(a["image"], b["image"])
  crops = {geometry(_example(), np.random.default_rng(s))["image"].tobytes() for s in range(10)}
  assert len(crops) > 3


def test_multiple_captions_pick_one_per_example_deterministically():
  example = {"image": np.full((8, 8, 3), 7, np.uint8), "caption": ["one", "two", "three"], "label": 4}
  preprocess = Preprocess(Geometry(image_size=8))
  picks = [preprocess(example, np.random.default_rng(s))["caption"] for s in range(20)]
  assert set(picks) == {"one", "two", "three"}
  assert picks == [preprocess(example, np.random.default_rng(s))["caption"] for s in range(20)]
  assert preprocess(example, np.random.default_rng(0))["label"].dtype == np.int32


def test_validate_image_size_names_the_problem():
  assert validate_image_size(256, 64) == 256
  with pytest.raises(ValueError, match="image_size 200 is not a multiple of 64.*try 192 or 256"):
    validate_image_size(200, 64)
  with pytest.raises(ValueError, match="positive integer, got -8"):
    validate_image_size(-8)
  with pytest.raises(ValueError, match="positive integer, got 64.0"):
    validate_image_size(64.0)
