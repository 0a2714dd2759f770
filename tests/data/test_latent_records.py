"""The ``ldm_jax.latents.v1`` records and ``data.source=latents``: round trips, metadata checks, the pipeline
(shuffling, per-process slices, resume). Records are written by the test itself (no model)."""

import os

import numpy as np
import pytest

from ldm_jax.data import latent_records as lr
from ldm_jax.data.config import default_data_config
from ldm_jax.data.pipeline import make_iterator
from ldm_jax.data.sources import has_captions

N, SIZE, LATENT = 22, 16, (4, 4, 3)


def _examples(seed=0, n=N):
  rng = np.random.default_rng(seed)
  return [dict(
      latent_mean=rng.normal(size=LATENT).astype(np.float32) * 3,
      latent_logvar=rng.uniform(-8, 1, size=LATENT).astype(np.float32),
      label=np.int32(i), boxes=rng.uniform(size=(3, 4)).astype(np.float32),
      caption=f"caption {i}", path=f"img/{i:03d}.png") for i in range(n)]


def _write(folder, examples, num_shards=3, dtype="float32", image_size=SIZE, complete=True):
  ranges = lr.shard_ranges(len(examples), num_shards)
  for k, (a, b) in enumerate(ranges):
    records = []
    for e in examples[a:b]:
      e = {k2: (v.astype(dtype) if k2.startswith("latent") else v) for k2, v in e.items()}
      records.append(lr.encode_record(e))
    lr.write_shard(os.path.join(folder, lr.shard_name("train", k, len(ranges))), records)
  lr.write_metadata(folder, "train", dict(
      split="train", num_shards=len(ranges), image_size=image_size, latent_shape=list(LATENT), dtype=dtype,
      complete=complete, num_records=len(examples), fields=sorted(examples[0])))


@pytest.fixture(scope="module")
def latents_dir(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("latents"))
  _write(folder, _examples())
  return folder


def _config(path):
  c = default_data_config()
  c.update(source="latents", path=path, image_size=SIZE, num_threads=0)
  return c


def test_records_round_trip_exactly_in_float32_and_to_float16_rounding():
  e = _examples(n=1)[0]
  e["caption"] = ["one", "two"]
  back = lr.decode_record(lr.encode_record(e))
  assert back.keys() == e.keys() and back["caption"] == ["one", "two"] and back["path"] == e["path"]
  for key in ("latent_mean", "latent_logvar", "boxes", "label"):
    assert back[key].dtype == e[key].dtype and back[key].shape == np.shape(e[key])
    np.testing.assert_array_equal(back[key], e[key])
  half = lr.decode_record(lr.encode_record({"latent_mean": e["latent_mean"].astype(np.float16)}))["latent_mean"]
  assert half.dtype == np.float16
  # float16 keeps 11 significant bits: relative error at most 2**-11 (|x| here >= 2**-14, no subnormals).
  np.testing.assert_allclose(half.astype(np.float32), e["latent_mean"], rtol=2.0**-11, atol=2.0**-24)


def test_bad_record_fields_are_refused_naming_them():
  with pytest.raises(ValueError, match="needs 'latent_mean'"):
    lr.encode_record({"caption": "x"})
  with pytest.raises(TypeError, match="'caption' must be a string"):
    lr.encode_record({"latent_mean": np.ones(2), "caption": 3})


def test_shard_ranges_cover_the_source_in_order():
  assert lr.shard_ranges(10, 3) == [(0, 3), (3, 6), (6, 10)]
  assert lr.shard_ranges(2, 5) == [(0, 1), (1, 2)]
  assert lr.shard_ranges(0, 4) == [(0, 0)]


def test_source_reads_every_record_in_shard_order(latents_dir):
  source = lr.open_latent_records(latents_dir, "train", SIZE)
  assert len(source) == N
  for i in (0, 7, N - 1):
    np.testing.assert_array_equal(source[i]["latent_mean"], _examples()[i]["latent_mean"])
    assert source[i]["path"] == f"img/{i:03d}.png"
  assert has_captions(_config(latents_dir))


def test_metadata_problems_are_refused_naming_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="train.latents.metadata.json.*precompute_latents.py"):
    lr.open_latent_records(str(tmp_path), "train", SIZE)
  _write(str(tmp_path), _examples(n=4), num_shards=2, complete=False)
  with pytest.raises(ValueError, match="unfinished.*rerun the same precompute_latents.py"):
    lr.open_latent_records(str(tmp_path), "train", SIZE)
  _write(str(tmp_path), _examples(n=4), num_shards=2)
  with pytest.raises(ValueError, match="made from 16px images but config.data.image_size is 32"):
    lr.open_latent_records(str(tmp_path), "train", 32)
  os.remove(tmp_path / lr.shard_name("train", 1, 2))
  with pytest.raises(FileNotFoundError, match="names 2 shards but 1 are missing"):
    lr.open_latent_records(str(tmp_path), "train", SIZE)
  _write(str(tmp_path), _examples(n=4), num_shards=1)  # the two-shard files stay behind
  with pytest.raises(ValueError, match="does not name.*another --num_shards"):
    lr.open_latent_records(str(tmp_path), "train", SIZE)


def test_batches_hold_latents_and_conditioning_but_no_image(tmp_path):
  _write(str(tmp_path), _examples(), dtype="float16")
  batch = next(make_iterator(_config(str(tmp_path)), "train", global_batch_size=4, seed=0, shuffle=False))
  assert "image" not in batch and "path" not in batch
  assert batch["latent_mean"].dtype == np.float32 and batch["latent_mean"].shape == (4, *LATENT)
  assert batch["label"].shape == (4,) and batch["boxes"].shape == (4, 3, 4)
  expected = np.stack([e["latent_mean"] for e in _examples()[:4]]).astype(np.float16).astype(np.float32)
  np.testing.assert_array_equal(batch["latent_mean"], expected)
  assert list(batch["caption"]) == [f"caption {i}" for i in range(4)]


def test_an_epoch_is_a_permutation_and_processes_split_each_batch(latents_dir):
  config = _config(latents_dir)
  one = make_iterator(config, "train", global_batch_size=4, seed=3)
  labels = np.concatenate([next(one)["label"] for _ in range(5)])  # 20 of the 22 records, shuffled
  assert len(set(labels.tolist())) == 20 and labels.tolist() != sorted(labels.tolist())
  halves = [make_iterator(config, "train", global_batch_size=4, seed=3, process_index=p, process_count=2)
            for p in range(2)]
  for batch in range(5):
    joined = np.concatenate([next(h)["label"] for h in halves])
    np.testing.assert_array_equal(joined, labels[4 * batch:4 * batch + 4])


def test_resume_mid_epoch_is_exact(latents_dir):
  config = _config(latents_dir)
  it = make_iterator(config, "train", global_batch_size=4, seed=1)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]  # crosses into the second epoch
  resumed = make_iterator(config, "train", global_batch_size=4, seed=1)
  resumed.set_state(state)
  for a, b in zip(expected, [next(resumed) for _ in range(4)]):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_settings_that_need_the_images_are_refused(latents_dir):
  config = _config(latents_dir)
  config.random_flip = True
  with pytest.raises(ValueError, match="data.crop='center' and data.random_flip=False"):
    make_iterator(config, "train", global_batch_size=4, seed=0)
  config = _config(latents_dir)
  config.conditioning.low_res = "bicubic"
  with pytest.raises(ValueError, match="data.conditioning.low_res='bicubic' is made from the images"):
    make_iterator(config, "train", global_batch_size=4, seed=0)
