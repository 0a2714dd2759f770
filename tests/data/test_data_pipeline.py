"""make_iterator on the built-in dataset: contents, order, resume, processes."""

import hashlib
import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ldm_jax.data import captioned_shapes as cs
from ldm_jax.data.config import default_data_config
from ldm_jax.data.pipeline import make_iterator
from ldm_jax.data.sharding import to_global_array

NUM_TRAIN = 24


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  c = default_data_config()
  c.data_dir = str(tmp_path_factory.mktemp("shapes"))
  c.image_size = 32
  c.shapes.num_train, c.shapes.num_validation, c.shapes.num_test = NUM_TRAIN, 8, 8
  c.num_threads = 0
  return c


@pytest.fixture(scope="module")
def records(config):
  builder = cs.build_captioned_shapes(config.data_dir, 32, NUM_TRAIN, 8, 8)
  source = builder.as_data_source("train")
  return [source[i] for i in range(len(source))]


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _fingerprints(batch):
  return [hashlib.sha1(image.tobytes()).hexdigest() for image in batch["image"]]


def _assert_same_batches(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_unshuffled_batches_hold_the_records_scaled_to_unit_range(config, records):
  it = make_iterator(config, "train", global_batch_size=4, seed=0, shuffle=False, num_epochs=1)
  batch = next(it)
  assert batch["image"].dtype == np.float32 and batch["image"].shape == (4, 32, 32, 3)
  for i, record in enumerate(records[:4]):
    np.testing.assert_allclose(batch["image"][i], record["image"].astype(np.float64) / 127.5 - 1, atol=1e-6)
    assert batch["caption"][i] == record["caption"].decode()
    assert batch["label"][i] == record["label"] and batch["num_objects"][i] == record["num_objects"]
    np.testing.assert_array_equal(batch["boxes"][i], record["objects"]["bbox"])
    np.testing.assert_array_equal(batch["box_labels"][i], record["objects"]["label"])
    np.testing.assert_array_equal(batch["segmentation"][i], record["segmentation"])
  assert {k: batch[k].dtype for k in ("label", "box_labels", "num_objects")} == dict.fromkeys(
      ("label", "box_labels", "num_objects"), np.int32)


def test_order_is_a_function_of_the_seed_and_each_epoch_reshuffles(config):
  def epochs(seed):
    it = make_iterator(config, "train", global_batch_size=4, seed=seed, num_epochs=2)
    return [h for batch in it for h in _fingerprints(batch)]

  order = epochs(5)
  assert order == epochs(5)
  assert order != epochs(6)
  first, second = order[:NUM_TRAIN], order[NUM_TRAIN:]
  assert len(second) == NUM_TRAIN and sorted(first) == sorted(second)  # each epoch: every record once
  assert first != second


def test_last_partial_batch_is_kept_without_drop_remainder(config):
  it = make_iterator(config, "validation", global_batch_size=3, seed=0, shuffle=False, num_epochs=1,
                     drop_remainder=False)
  sizes = [len(batch["label"]) for batch in it]
  assert sizes == [3, 3, 2]


def test_resume_from_saved_state_continues_exactly(config):
  config = config.copy_and_resolve_references()
  config.crop, config.random_flip = "random", True
  it = make_iterator(config, "train", global_batch_size=4, seed=9)
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 5)  # crosses into the second epoch
  resumed = make_iterator(config, "train", global_batch_size=4, seed=9)
  resumed.set_state(state)
  _assert_same_batches(_take(resumed, 5), expected)


def test_grain_orbax_checkpoint_handler_saves_and_restores_the_iterator(config, tmp_path):
  import grain
  from etils import epath

  it = make_iterator(config, "train", global_batch_size=4, seed=1)
  _take(it, 2)
  grain.checkpoint.CheckpointHandler().save(epath.Path(tmp_path), item=it)
  expected = _take(it, 2)
  restored = grain.checkpoint.CheckpointHandler().restore(
      epath.Path(tmp_path), item=make_iterator(config, "train", global_batch_size=4, seed=1))
  _assert_same_batches(_take(restored, 2), expected)


def test_processes_read_disjoint_slices_that_make_up_the_global_batch(config):
  kwargs = dict(global_batch_size=8, seed=2)
  single = _take(make_iterator(config, "train", **kwargs, process_index=0, process_count=1), 4)
  halves = [_take(make_iterator(config, "train", **kwargs, process_index=p, process_count=2), 4) for p in (0, 1)]
  for step, global_batch in enumerate(single):
    first, second = halves[0][step], halves[1][step]
    assert len(first["image"]) == len(second["image"]) == 4
    assert not set(_fingerprints(first)) & set(_fingerprints(second))
    for key in global_batch:
      np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), global_batch[key], err_msg=key)
  message = "global batch size 6 must be a positive multiple of the number of processes \\(4\\)"
  with pytest.raises(ValueError, match=message):
    make_iterator(config, "train", global_batch_size=6, seed=0, process_index=0, process_count=4)


def test_worker_processes_give_the_same_batches_and_resume(config):
  config = config.copy_and_resolve_references()
  config.crop, config.random_flip = "random", True
  expected = _take(make_iterator(config, "train", global_batch_size=4, seed=4), 4)
  config.num_workers = 2
  it = make_iterator(config, "train", global_batch_size=4, seed=4)
  try:
    _assert_same_batches(_take(it, 2), expected[:2])
    state = json.loads(json.dumps(it.get_state()))
  finally:
    it.close()
  resumed = make_iterator(config, "train", global_batch_size=4, seed=4)
  try:
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 2), expected[2:])
  finally:
    resumed.close()


def test_tokens_come_from_the_configured_tokenizer(config):
  config = config.copy_and_resolve_references()
  config.tokenizer.kind, config.tokenizer.max_length = "shapes", 32
  batch = next(make_iterator(config, "train", global_batch_size=4, seed=0))
  assert batch["tokens"].shape == batch["attention_mask"].shape == (4, 32)
  assert batch["tokens"].dtype == np.int32
  from ldm_jax.data.tokenizers import load_tokenizer

  tokenizer = load_tokenizer(config.tokenizer)
  for ids, mask, text in zip(batch["tokens"], batch["attention_mask"], batch["caption"]):
    words = tokenizer.convert_ids_to_tokens(ids[mask == 1].tolist())
    assert words == ["[CLS]"] + text.replace(",", " ,").split() + ["[SEP]"]


def test_to_global_array_shards_numeric_fields_and_keeps_captions_on_host(config):
  batch = next(make_iterator(config, "train", global_batch_size=8, seed=0))
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  global_batch = to_global_array(batch, sharding)
  for key, value in batch.items():
    if key == "caption":
      assert global_batch[key] is value
      continue
    assert isinstance(global_batch[key], jax.Array) and global_batch[key].sharding == sharding
    np.testing.assert_array_equal(np.asarray(global_batch[key]), value)
  assert len(global_batch["image"].addressable_shards) == 8


def test_bad_settings_fail_at_start_with_a_clear_message(config):
  with pytest.raises(ValueError, match="captioned_shapes has no split 'nosuch'"):
    make_iterator(config, "nosuch", global_batch_size=4, seed=0)
  bad = config.copy_and_resolve_references()
  bad.image_size = 48
  with pytest.raises(ValueError, match="built at image sizes"):
    make_iterator(bad, "train", global_batch_size=4, seed=0)
  bad.image_size = 0
  with pytest.raises(ValueError, match="image_size must be a positive integer"):
    make_iterator(bad, "train", global_batch_size=4, seed=0)
  bad = config.copy_and_resolve_references()
  bad.source = "lmdb"
  with pytest.raises(ValueError, match="Unknown data source 'lmdb'"):
    make_iterator(bad, "train", global_batch_size=4, seed=0)
  bad = config.copy_and_resolve_references()
  bad.crop = "zoom"
  with pytest.raises(ValueError, match="Unknown crop 'zoom'"):
    make_iterator(bad, "train", global_batch_size=4, seed=0)
