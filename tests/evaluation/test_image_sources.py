"""Folders of images for evaluation: unreadable files are named (issue: reliability, data accounting)."""

import numpy as np
import pytest
from PIL import Image

from ldm_jax.evaluation.image_sources import folder_batches


def test_an_unreadable_image_in_a_folder_is_named_and_left_out(tmp_path, caplog):
  rng = np.random.default_rng(0)
  for name in ("a.png", "c.png", "d.png"):
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / name)
  (tmp_path / "b.png").write_bytes(b"not a png")
  batches = list(folder_batches(str(tmp_path), size=16, batch_size=2))
  assert [b.shape[0] for b, _ in batches] == [2, 1]  # three readable images, in batches of two
  assert "b.png" in caplog.text and "1 of 4 images" in caplog.text


def test_a_folder_of_unreadable_images_is_an_error_naming_them(tmp_path):
  for name in ("x.png", "y.png"):
    (tmp_path / name).write_bytes(b"garbage")
  with pytest.raises(ValueError, match=r"none of the 2 images .* could be read, e.g. \['x.png', 'y.png'\]"):
    list(folder_batches(str(tmp_path), size=16, batch_size=2))
