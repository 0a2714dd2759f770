"""Input data that cannot be used (issue 31, items 2 and 9): a dataset of unreadable images stops with an error
naming them instead of skipping forever; skipped records and images without captions are counted in the
metrics log, the missing-caption policy is a config choice, and bad files are named in warnings."""

import io
import json
import threading

import numpy as np
import pytest
import toy_training as toy
from PIL import Image

from ldm_jax.data import make_iterator
from ldm_jax.data.config import default_data_config
from ldm_jax.data.skipping import TooManySkipsError


def _folder_config(path, **overrides):
  config = default_data_config()
  config.source, config.path, config.image_size, config.num_threads = "folder", str(path), 8, 0
  config.update(overrides)
  return config


def _png(seed: int) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()


def test_a_dataset_of_unreadable_images_stops_with_an_error_naming_them(tmp_path):
  for name in ("a.png", "b.jpg", "c.webp"):
    (tmp_path / name).write_bytes(b"not an image")
  iterator = make_iterator(_folder_config(tmp_path), "train", global_batch_size=2, seed=0)
  outcome = {}

  def first_batch():
    try:
      outcome["batch"] = next(iterator)
    except Exception as error:  # inspected below
      outcome["error"] = error

  thread = threading.Thread(target=first_batch, daemon=True)  # daemon: an endless skip loop must not hang pytest
  thread.start()
  thread.join(timeout=60)
  assert "error" in outcome, "still skipping unreadable records after 60 s" if thread.is_alive() else outcome
  assert isinstance(outcome["error"], TooManySkipsError)
  message = str(outcome["error"])
  assert "200 of the last 200 records could not be used" in message and "data.max_skip_fraction" in message
  assert any(f"{name}: cannot decode image" in message for name in ("a.png", "b.jpg", "c.webp")), message


@pytest.fixture
def mixed_folder(tmp_path):
  """Two captioned images (one caption not UTF-8), one without a caption, one unreadable."""
  root = tmp_path / "images"
  root.mkdir()
  (root / "good.png").write_bytes(_png(0))
  (root / "good.txt").write_text("a red square")
  (root / "latin1.png").write_bytes(_png(1))
  (root / "latin1.txt").write_bytes("a café".encode("latin-1"))
  (root / "uncaptioned.png").write_bytes(_png(2))
  (root / "broken.png").write_bytes(b"not an image")
  return root


def test_skips_and_missing_captions_are_counted_in_the_metrics_and_named(mixed_folder, tmp_path, caplog):
  iterator = make_iterator(_folder_config(mixed_folder), "train", global_batch_size=8, seed=0)
  batches = ({"x": b["image"].reshape(8, -1)[:, :toy.D_IN]} for b in iterator)
  toy.run(tmp_path / "run", 4, toy.two_device_mesh(), data=(batches, iterator))
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    last = [json.loads(line) for line in f][-1]
  counts = iterator.counters()
  assert last["step"] == 4 and counts["data/skipped"] > 0 and counts["data/missing_captions"] > 0
  assert last["data/skipped"] == counts["data/skipped"]
  assert last["data/missing_captions"] == counts["data/missing_captions"]
  assert "uncaptioned.png has no caption file" in caplog.text
  assert "latin1.txt is not valid UTF-8" in caplog.text and "broken.png: cannot decode image" in caplog.text


def test_the_missing_caption_policy_is_a_config_choice(mixed_folder):
  captions = {}
  for policy in ("empty", "skip"):
    iterator = make_iterator(_folder_config(mixed_folder, missing_caption=policy), "train", global_batch_size=4,
                             seed=0)
    captions[policy] = {c for _ in range(6) for c in next(iterator)["caption"]}
    assert iterator.counters()["data/missing_captions"] > 0
  assert captions["empty"] == {"", "a red square", "a caf\ufffd"}
  assert captions["skip"] == {"a red square", "a caf\ufffd"}
  with pytest.raises(ValueError, match=r"data.missing_caption must be one of \('empty', 'skip'\), got 'drop'"):
    make_iterator(_folder_config(mixed_folder, missing_caption="drop"), "train", global_batch_size=4, seed=0)

