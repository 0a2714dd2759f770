"""A real TFDS dataset name through the pipeline (mocked records, no TensorFlow)."""

import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ldm_jax.data.config import default_data_config
from ldm_jax.data.pipeline import make_iterator


def _mnist_config(data_dir):
  config = default_data_config()
  config.source, config.name, config.data_dir = "tfds", "mnist", str(data_dir)
  config.image_size, config.label_key, config.num_threads = 32, "label", 0
  return config


def test_mnist_by_name_gives_rgb_resized_images_and_labels(tmp_path):
  config = _mnist_config(tmp_path)
  with tfds.testing.mock_data(num_examples=6):
    records = tfds.data_source("mnist", split="train", data_dir=str(tmp_path))
    expected = [records[i] for i in range(6)]
    batch = next(make_iterator(config, "train", global_batch_size=6, seed=0, shuffle=False))
  assert batch.keys() == {"image", "label"}
  assert batch["image"].shape == (6, 32, 32, 3) and batch["label"].dtype == np.int32
  for i, record in enumerate(expected):
    assert batch["label"][i] == record["label"]
    gray = record["image"][..., 0]  # (28, 28, 1) uint8 from TFDS
    resized = np.asarray(Image.fromarray(gray).resize((32, 32), Image.Resampling.BICUBIC))
    np.testing.assert_allclose(batch["image"][i], np.repeat(resized[..., None], 3, -1) / 127.5 - 1, atol=1e-6)
  assert "tensorflow" not in sys.modules


def test_tokenizer_without_a_caption_field_is_rejected(tmp_path):
  config = _mnist_config(tmp_path)
  config.tokenizer.kind = "shapes"
  with pytest.raises(ValueError, match="no captions: set config.data.caption_key"):
    make_iterator(config, "train", global_batch_size=2, seed=0)


def test_unknown_or_unprepared_tfds_datasets_fail_at_start(tmp_path):
  config = _mnist_config(tmp_path)
  config.name = "no_such_dataset_xyz"
  with pytest.raises(ValueError, match="Unknown TFDS dataset 'no_such_dataset_xyz'"):
    make_iterator(config, "train", global_batch_size=2, seed=0)
  config.name = "mnist"  # registered, but nothing prepared in tmp_path
  how = "tfds build mnist --data_dir=DIR --file_format=array_record"
  with pytest.raises(FileNotFoundError, match=f"'mnist' is not prepared in .*{how}"):
    make_iterator(config, "train", global_batch_size=2, seed=0)
  config.name = ""
  with pytest.raises(ValueError, match="config.data.name is empty"):
    make_iterator(config, "train", global_batch_size=2, seed=0)


def test_a_prepared_copy_is_read_from_its_files_with_mapped_field_names(tmp_path):
  from ldm_jax.data.captioned_shapes import build_captioned_shapes

  builder = build_captioned_shapes(tmp_path, 32, 8, 4, 4, seed=1)
  config = _mnist_config(tmp_path)
  # Read by name like any user-prepared dataset: from files, not our builder code.
  config.name = f"captioned_shapes/{builder.builder_config.name}"
  config.caption_key, config.label_key = "caption", "label"
  batch = next(make_iterator(config, "validation", global_batch_size=4, seed=0, shuffle=False))
  records = builder.as_data_source("validation")
  assert batch.keys() == {"image", "caption", "label"}
  for i in range(4):
    assert batch["caption"][i] == records[i]["caption"].decode() and batch["label"][i] == records[i]["label"]
    np.testing.assert_allclose(batch["image"][i], records[i]["image"] / 127.5 - 1, atol=1e-6)
  with pytest.raises(ValueError, match="has no split 'dev'; its splits are \\['test', 'train', 'validation'\\]"):
    make_iterator(config, "dev", global_batch_size=4, seed=0)
