"""The demo's colour/shape judge: it learns colour, scores requested pairs,
and its Fréchet distance separates real renders from noise."""

import numpy as np
import pytest

from ldm_jax.data import captioned_shapes as shapes
from ldm_jax.evaluation import shapes_judge


@pytest.fixture(scope="module")
def judge():
  return shapes_judge.train_judge(32, steps=150, per_pair=8, seed=0)


def _uint8(images):
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def test_judge_scores_requested_pairs(judge):
  assert judge.heldout_colour_accuracy >= 0.9
  pairs = [p for p in shapes.WITHHELD_PAIRS for _ in range(4)]
  images, _, _ = shapes_judge.render_single_objects(shapes.WITHHELD_PAIRS, 4, 32, seed=11)
  reference, _, _ = shapes_judge.render_single_objects(shapes.WITHHELD_PAIRS, 4, 32, seed=12)
  right = shapes_judge.judge_generated(judge, _uint8(images), pairs, _uint8(reference))
  rotated = pairs[4:] + pairs[:4]  # every image now paired with another colour
  wrong = shapes_judge.judge_generated(judge, _uint8(images), rotated, _uint8(reference))
  assert right["colour_accuracy"] >= 0.9 and wrong["colour_accuracy"] <= 0.1
  noise = np.random.default_rng(0).integers(0, 256, images.shape).astype(np.uint8)
  far = shapes_judge.judge_generated(judge, noise, pairs, _uint8(reference))
  assert far["frechet_distance"] > 5 * right["frechet_distance"]
