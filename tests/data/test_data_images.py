"""Image decoding, image folders, bad files, and the ArrayRecord prepare round trip."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from ldm_jax.data import prepare
from ldm_jax.data.config import default_data_config
from ldm_jax.data.images import UnreadableImageError, decode_image
from ldm_jax.data.pipeline import make_iterator

RNG = np.random.default_rng(0)


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, fmt, **kwargs)
  return buffer.getvalue()


# --- decoding odd modes ------------------------------------------------------


def test_grayscale_and_16_bit_become_repeated_rgb():
  gray = RNG.integers(0, 256, (5, 7), dtype=np.uint8)
  np.testing.assert_array_equal(decode_image(_encode(Image.fromarray(gray, "L"))), np.repeat(gray[..., None], 3, -1))
  deep = RNG.integers(0, 65536, (5, 7), dtype=np.uint16)
  expected = np.round(deep / 257.0).astype(np.uint8)
  decoded = decode_image(_encode(Image.fromarray(deep)))  # opens as mode I;16
  np.testing.assert_array_equal(decoded, np.repeat(expected[..., None], 3, -1))
  np.testing.assert_array_equal(decode_image(deep), decoded)  # same rule for decoded arrays


def test_palette_cmyk_and_alpha_convert_to_rgb():
  palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
  indices = RNG.integers(0, 256, (4, 6), dtype=np.uint8)
  p_image = Image.fromarray(indices, "P")
  p_image.putpalette(palette.ravel().tolist())
  np.testing.assert_array_equal(decode_image(_encode(p_image)), palette[indices])

  cmyk = RNG.integers(0, 256, (4, 6, 4), dtype=np.uint8)
  c, k = cmyk[..., :3].astype(float), cmyk[..., 3:].astype(float)
  expected = (255 - c) * (255 - k) / 255  # the usual naive CMYK -> RGB
  decoded = decode_image(_encode(Image.fromarray(cmyk, "CMYK"), "TIFF"))
  np.testing.assert_allclose(decoded, expected, atol=1)

  rgba = RNG.integers(0, 256, (4, 6, 4), dtype=np.uint8)
  alpha = rgba[..., 3:] / 255.0
  on_white = rgba[..., :3] * alpha + 255 * (1 - alpha)
  np.testing.assert_allclose(decode_image(_encode(Image.fromarray(rgba, "RGBA"))), on_white, atol=0.51)
  np.testing.assert_allclose(decode_image(rgba), on_white, atol=0.51)


def test_corrupt_bytes_raise_unreadable_image_error():
  good = _encode(Image.fromarray(RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)))
  with pytest.raises(UnreadableImageError, match="cannot decode image"):
    decode_image(good[: len(good) // 2])
  with pytest.raises(UnreadableImageError):
    decode_image(RNG.integers(0, 256, 300, dtype=np.uint8).tobytes())


# --- image folders -----------------------------------------------------------


def _rgb(height, width):
  return RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  """Six good images (odd modes among them), two bad ones, some captions."""
  root = tmp_path_factory.mktemp("images")
  (root / "nested" / "deeper").mkdir(parents=True)
  expected = {}  # relative path -> (RGB array the pipeline must see, caption)

  def save(relative, image, rgb, caption=None, fmt=None, **kwargs):
    image.save(root / relative, fmt, **kwargs)
    if caption is not None:
      (root / relative).with_suffix(".txt").write_text(caption + "\n")
    expected[relative] = (rgb, caption or "")

  rgb = _rgb(32, 32)
  save("a_rgb.png", Image.fromarray(rgb), rgb, "a red apple")
  gray = RNG.integers(0, 256, (32, 32), dtype=np.uint8)
  save("b_gray.png", Image.fromarray(gray, "L"), np.repeat(gray[..., None], 3, -1), "a grey thing")
  rgba = RNG.integers(0, 256, (32, 32, 4), dtype=np.uint8)
  save("nested/c_alpha.png", Image.fromarray(rgba, "RGBA"), decode_image(rgba))
  deep = RNG.integers(0, 65536, (32, 32), dtype=np.uint16)
  save("nested/d_16bit.PNG", Image.fromarray(deep), decode_image(deep), "deep")
  lossless = _rgb(32, 32)
  save("nested/deeper/e.webp", Image.fromarray(lossless), lossless, "a webp", lossless=True)
  bmp = _rgb(32, 32)
  save("f.bmp", Image.fromarray(bmp), bmp, "a bitmap")
  good = _encode(Image.fromarray(_rgb(32, 32)))
  (root / "g_truncated.png").write_bytes(good[: len(good) // 3])
  (root / "h_noise.jpg").write_bytes(RNG.integers(0, 256, 500, dtype=np.uint8).tobytes())
  (root / "notes.md").write_text("not an image")
  return root, expected


def _folder_config(path, source="folder"):
  config = default_data_config()
  config.source, config.path, config.image_size, config.num_threads = source, str(path), 32, 0
  return config


def _all_examples(config, split="train", batch_size=2):
  iterator = make_iterator(config, split, global_batch_size=batch_size, seed=0, shuffle=False, num_epochs=1,
                           drop_remainder=False)
  batches = list(iterator)
  merged = {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
  return merged, iterator


def test_folder_pipeline_converts_modes_reads_captions_and_skips_bad_files(image_folder):
  root, expected = image_folder
  examples, iterator = _all_examples(_folder_config(root))
  assert iterator.num_skipped == 2  # the truncated PNG and the random bytes
  assert iterator.get_state()["num_skipped"] == 2
  order = sorted(expected)
  assert list(examples["caption"]) == [expected[path][1] for path in order]
  for image, path in zip(examples["image"], order):
    np.testing.assert_allclose(image, expected[path][0] / 127.5 - 1, atol=1e-6, err_msg=path)


def test_prepare_round_trip_folder_to_array_record_to_pipeline(image_folder, tmp_path):
  root, _ = image_folder
  assert prepare.main(["--input", str(root), "--output", str(tmp_path), "--num-shards", "3"]) == 0
  metadata = json.loads((tmp_path / "train.metadata.json").read_text())
  assert metadata["num_records"] == 8 and metadata["num_shards"] == 3
  assert sorted(os.listdir(tmp_path)) == sorted(metadata["shards"] + ["train.metadata.json"])
  from_folder, _ = _all_examples(_folder_config(root))
  from_shards, iterator = _all_examples(_folder_config(tmp_path / "{split}.array_record-*", "array_record"))
  assert iterator.num_skipped == 2
  assert from_shards.keys() == from_folder.keys()
  for key in from_folder:
    np.testing.assert_array_equal(from_shards[key], from_folder[key], err_msg=key)
  # A folder path finds the split's shards too.
  from_dir, _ = _all_examples(_folder_config(tmp_path, "array_record"))
  np.testing.assert_array_equal(from_dir["image"], from_folder["image"])


def test_missing_or_empty_inputs_fail_at_start_naming_them(tmp_path, capsys):
  with pytest.raises(FileNotFoundError, match="Image folder .*nowhere.* does not exist"):
    make_iterator(_folder_config(tmp_path / "nowhere"), "train", global_batch_size=2, seed=0)
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "readme.txt").write_text("no images here")
  with pytest.raises(ValueError, match="Image folder .*empty.* holds no images"):
    make_iterator(_folder_config(tmp_path / "empty"), "train", global_batch_size=2, seed=0)
  with pytest.raises(FileNotFoundError, match="No ArrayRecord shards match .*validation.*ldm_jax.data.prepare"):
    make_iterator(_folder_config(tmp_path, "array_record"), "validation", global_batch_size=2, seed=0)
  assert prepare.main(["--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")]) == 1
  assert "does not exist" in capsys.readouterr().err


def test_non_square_images_are_resized_on_the_shorter_side_and_centre_cropped(tmp_path):
  wide = _rgb(40, 100)
  Image.fromarray(wide).save(tmp_path / "wide.png")
  config = _folder_config(tmp_path)
  config.image_size = 20
  examples, _ = _all_examples(config, batch_size=1)
  # Independent computation: Pillow's antialiased bicubic to 20x50, middle 20 columns.
  reference = np.asarray(Image.fromarray(wide).resize((50, 20), Image.Resampling.BICUBIC))[:, 15:35]
  np.testing.assert_allclose(examples["image"][0], reference / 127.5 - 1, atol=1e-6)
