"""Host-side inpainting masks: LaMa's strokes and boxes, and plain rectangles."""

import jax
import numpy as np
import pytest
from scipy import ndimage

from ldm_jax.data import inpaint_masks as im
from ldm_jax.models.latent_diffusion import random_inpaint_masks


def test_a_segment_covers_the_pixels_within_half_its_width():
  mask = np.zeros((64, 64), bool)
  im.draw_segment(mask, (10, 20), (40, 20), 9)
  y, x = np.mgrid[0:64, 0:64]
  # A horizontal capsule: the band |y - 20| <= 4.5 between the ends, discs of radius 4.5 at them.
  body = (x >= 10) & (x <= 40) & (np.abs(y - 20) <= 4.5)
  caps = ((x - 10) ** 2 + (y - 20) ** 2 <= 4.5**2) | ((x - 40) ** 2 + (y - 20) ** 2 <= 4.5**2)
  np.testing.assert_array_equal(mask, body | caps)
  assert mask[:, 25].sum() == 9  # the width, measured across
  diagonal = np.zeros((64, 64), bool)
  im.draw_segment(diagonal, (5, 5), (50, 40), 11)
  depth = ndimage.distance_transform_edt(diagonal)
  assert 5 <= depth.max() <= 6.5  # half the width, up to the pixel grid


def test_masks_are_a_function_of_the_seed():
  gen = im.MaskGenerator("lama", "thick")
  first = gen(np.random.default_rng([7, 3]), 64, 64)
  assert first.shape == (64, 64, 1) and first.dtype == np.float32 and set(np.unique(first)) <= {0.0, 1.0}
  np.testing.assert_array_equal(first, gen(np.random.default_rng([7, 3]), 64, 64))
  others = [gen(np.random.default_rng([7, i]), 64, 64) for i in range(4, 10)]
  assert all(not np.array_equal(first, other) for other in others)


@pytest.mark.parametrize("size", [64, 128])
def test_strokes_are_connected_polylines_at_least_one_brush_thick(size):
  # LaMa's generator class draws min_times..max_times + 1 strokes: (1, 0) is exactly one.
  one = im.Strokes(max_len=60, max_width=20, min_times=1, max_times=0)
  scale = size / 256
  for seed in range(30):
    mask = im.stroke_mask(np.random.default_rng(seed), size, size, one, scale)
    _, components = ndimage.label(mask, structure=np.ones((3, 3)))
    assert components == 1
    assert ndimage.distance_transform_edt(mask).max() >= 5 / 2 * scale - 1  # brushes are >= 5 LaMa pixels wide


def test_stroke_segments_follow_lamas_parameters(monkeypatch):
  """Segment by segment: 1-5 per stroke, chained end to start, widths 5 + U{0..max_width-1} and lengths
  up to 10 + max_len - 1 LaMa pixels, scaled to the image."""
  calls = []
  monkeypatch.setattr(im, "draw_segment", lambda mask, start, end, width: calls.append((start, end, width)))
  strokes, scale = im.Strokes(max_len=40, max_width=10, min_times=4, max_times=50), 0.5
  counts, widths = [], set()
  for seed in range(20):
    calls.clear()
    im.stroke_mask(np.random.default_rng(seed), 128, 128, strokes, scale)
    chained = [i for i in range(1, len(calls)) if calls[i][0] == calls[i - 1][1]]
    counts.append(len(calls) - len(chained))  # strokes: segments that do not start where the last ended
    for start, end, width in calls:
      widths.add(round(width / scale))
      # Ends are truncated to whole LaMa pixels: up to one diagonal pixel longer.
      assert np.hypot(end[0] - start[0], end[1] - start[1]) <= (10 + 39 + np.sqrt(2)) * scale
  assert min(counts) >= 4 and max(counts) <= 51 and np.ptp(counts) > 10
  assert widths == set(range(5, 15))


def test_eval_masks_stay_within_the_protocols_hole_fractions():
  for preset in ("thick", "medium", "thin"):
    fractions = np.array([im.lama_mask(np.random.default_rng([1, i]), 64, 64, preset).mean() for i in range(100)])
    assert fractions.min() > 0 and fractions.max() <= 0.5  # LaMa's max_tamper_area
    if preset != "medium":  # the paper's hard subset, 40-50% holes, is well populated
      assert np.mean(fractions >= 0.4) > 0.05
  train = np.array([im.lama_mask(np.random.default_rng([2, i]), 64, 64, "train").mean() for i in range(100)])
  assert train.max() > 0.5  # training masks are not capped
  assert 0.2 < train.mean() < 0.5


def test_masks_scale_with_the_image():
  """The same seed draws the same LaMa mask at 64 and 256 px, up to the pixel grid."""
  close = []
  for i in range(30):
    small = im.lama_mask(np.random.default_rng([4, i]), 64, 64, "train")[..., 0]
    big = im.lama_mask(np.random.default_rng([4, i]), 256, 256, "train")[..., 0]
    pooled = big.reshape(64, 4, 64, 4).mean(axis=(1, 3))
    close.append(np.abs(pooled - small).mean() < 0.05)
  assert np.mean(close) > 0.9


def test_boxes_keep_the_margin_and_refuse_images_too_small():
  boxes = im.Boxes(margin=10, bbox_min_size=30, bbox_max_size=150, min_times=1, max_times=4)
  for seed in range(20):
    mask = im.box_mask(np.random.default_rng(seed), 256, 256, boxes)
    assert mask.any() and not mask[:10].any() and not mask[-10:].any()
    assert not mask[:, :10].any() and not mask[:, -10:].any()
  with pytest.raises(ValueError, match="leaves no room"):
    im.box_mask(np.random.default_rng(0), 40, 40, boxes)


def test_rectangles_match_the_train_steps_distribution():
  """One rectangle per mask, sides uniform in 10-60%: mean hole fraction 0.35^2 on host and device."""
  n, size = 400, 40
  host = np.stack([im.MaskGenerator("rectangles")(np.random.default_rng([5, i]), size, size) for i in range(n)])
  device = np.asarray(random_inpaint_masks(jax.random.key(0), (n, size, size)))
  for masks in (host, device):
    rows, cols = masks[..., 0].any(2).sum(1), masks[..., 0].any(1).sum(1)
    np.testing.assert_array_equal(masks.sum((1, 2, 3)), rows * cols)  # a single filled rectangle
    assert rows.min() >= 0.1 * size - 1 and rows.max() <= 0.6 * size + 1
    np.testing.assert_allclose(masks.mean(), 0.35**2, atol=0.012)  # 3 standard errors


def test_unknown_kinds_and_presets_name_the_choices():
  with pytest.raises(ValueError, match="one of"):
    im.MaskGenerator("device_rectangles")
  with pytest.raises(ValueError, match="lama_preset must be one of"):
    im.MaskGenerator("lama", "huge")
