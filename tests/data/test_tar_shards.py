"""Webdataset tar shards (issue 28): shard patterns, the per-sample index, broken shards and images skipped and
counted, the missing-caption policy, size filters, resume mid-shard, per-process slices, and a batch end to end.

Every shard is written here with tarfile and PIL, from random pixels and known captions."""

import io
import json
import logging
import os
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from ldm_jax.data.config import default_data_config
from ldm_jax.data.pipeline import make_iterator
from ldm_jax.data.sources import open_source
from ldm_jax.data.tar_shards import TarShardSource, expand_braces, index_shard, resolve_tar_shards

NUM_SHARDS, PER_SHARD = 3, 5


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format=fmt)
  return buffer.getvalue()


def _image(rng, height: int, width: int, fmt: str = "PNG") -> bytes:
  return _encode(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), fmt)


def _write_tar(path, samples) -> list[tarfile.TarInfo]:
  """``samples``: (key, {ext: bytes}) in order; returns the members as written (with their offsets)."""
  with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
    for key, members in samples:
      for ext, data in members.items():
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  with tarfile.open(path) as tar:
    return tar.getmembers()


def _config(path, **overrides):
  config = default_data_config()
  config.source, config.path, config.image_size, config.num_threads = "webdataset", str(path), 8, 0
  config.update(overrides)
  return config


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same_batches(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """3 shards of 5 samples, JPEG and PNG, captioned by .txt, by .json "caption" or "text", or both (.txt wins)."""
  root = tmp_path_factory.mktemp("wds")
  rng = np.random.default_rng(0)
  expected = {}
  for shard in range(NUM_SHARDS):
    samples = []
    for i in range(PER_SHARD):
      key, n = f"{shard:05d}{i:04d}", shard * PER_SHARD + i
      height, width = (int(v) for v in rng.integers(10, 30, 2))
      image = _image(rng, height, width, "JPEG" if n % 2 else "PNG")
      caption, original = f"caption number {n}", None
      members = {"jpg" if n % 2 else "png": image}
      mode = n % 4
      if mode in (0, 2):
        members["txt"] = f"  {caption}\n".encode()
      if mode in (1, 2):
        original = (3 * height, 2 * width)
        metadata = {"caption": caption if mode == 1 else "not this one", "width": width, "height": height,
                    "original_width": original[1], "original_height": original[0]}
        members["json"] = json.dumps(metadata).encode()
      if mode == 3:
        members["json"] = json.dumps({"text": caption, "url": "http://x"}).encode()
      samples.append((key, members))
      expected[f"{shard:05d}.tar/{key}"] = (image, caption, original)
    _write_tar(root / f"{shard:05d}.tar", samples)
  return root, expected


def test_brace_expansion_keeps_zero_padding_and_multiplies_braces():
  assert expand_braces("s/{00000..00002}.tar") == ["s/00000.tar", "s/00001.tar", "s/00002.tar"]
  assert expand_braces("{098..101}") == ["098", "099", "100", "101"]
  assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
  assert expand_braces("{3..1}.tar") == ["3.tar", "2.tar", "1.tar"]
  assert expand_braces("x{y}.tar") == ["x{y}.tar"]  # neither range nor list: literal, as in bash


def test_shards_resolve_from_braces_globs_folders_and_splits(dataset, tmp_path):
  root, _ = dataset
  shards = [str(root / f"{i:05d}.tar") for i in range(NUM_SHARDS)]
  assert resolve_tar_shards(f"{root}/{{00000..00002}}.tar", "train") == shards
  assert resolve_tar_shards(f"{root}/*.tar", "train") == shards
  assert resolve_tar_shards(str(root), "train") == shards
  assert resolve_tar_shards(f"{root}/{{00002..00002}}.tar::{root}/0000[01].tar", "train") == shards[2:] + shards[:2]
  os.symlink(root, tmp_path / "train")
  assert resolve_tar_shards(f"{tmp_path}/{{split}}/{{00000..00001}}.tar", "train") == [
      str(tmp_path / "train" / f"{i:05d}.tar") for i in range(2)]
  with pytest.raises(FileNotFoundError, match=r"No tar shards match '.*/nothing-\*\.tar'"):
    resolve_tar_shards(f"{root}/nothing-*.tar", "train")
  with pytest.raises(FileNotFoundError, match=r"names 2 shard\(s\) that do not exist: '.*/00003.tar', '.*/00004.tar'"):
    resolve_tar_shards(f"{root}/{{00000..00004}}.tar", "train")
  (tmp_path / "no_tars").mkdir()
  with pytest.raises(FileNotFoundError, match="no_tars' .* holds no .tar files"):
    resolve_tar_shards(str(tmp_path / "no_tars"), "train")
  with pytest.raises(ValueError, match="config.data.path is empty"):
    open_source(_config(""), "train")


def test_every_sample_is_read_once_with_its_image_caption_and_original_size(dataset):
  root, expected = dataset
  source = open_source(_config(f"{root}/{{00000..00002}}.tar"), "train")
  assert len(source) == NUM_SHARDS * PER_SHARD and source.num_broken == 0
  seen = {}
  for i in range(len(source)):
    record = source[i]
    seen[record["path"].removeprefix(f"{root}/")] = (record["image"], record["caption"], record["original_size"])
  assert seen == expected
  # grain's worker processes receive the source pickled.
  assert pickle.loads(pickle.dumps(source))[7] == source[7]


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
  """Shard a: two good samples, a corrupt image, a sample without an image. Shard b: cut in its third sample's
  image."""
  root = tmp_path_factory.mktemp("broken")
  rng = np.random.default_rng(1)
  _write_tar(root / "a.tar", [
      ("a0", {"png": _image(rng, 9, 11), "txt": b"good a0"}),
      ("a1", {"jpg": b"\xff\xd8 not a jpeg at all", "txt": b"corrupt a1"}),
      ("a2", {"txt": b"no image a2", "json": b"{}"}),
      ("a3", {"webp": _encode(rng.integers(0, 256, (12, 9, 3), dtype=np.uint8), "WEBP"), "txt": b"good a3"}),
  ])
  members = _write_tar(root / "b.tar", [(f"b{i}", {"png": _image(rng, 16, 16), "txt": f"good b{i}".encode()})
                                        for i in range(4)])
  cut = next(m for m in members if m.name == "b2.png")
  with open(root / "b.tar", "r+b") as f:
    f.truncate(cut.offset_data + cut.size // 2)
  return root


def test_truncated_shards_corrupt_images_and_imageless_samples_are_skipped_counted_and_named(broken, caplog):
  config = _config(f"{broken}/{{a,b}}.tar")
  iterator = make_iterator(config, "train", global_batch_size=2, seed=0, shuffle=False, num_epochs=1,
                           drop_remainder=False)
  assert "b.tar is truncated (member 'b2.png' is cut off" in caplog.text
  assert "indexed its 2 complete samples; 1 cut-off sample(s) will be skipped" in caplog.text
  captions = [c for batch in iterator for c in batch["caption"]]
  assert captions == ["good a0", "good a3", "good b0", "good b1"]
  assert iterator.counters() == {"data/skipped": 3, "data/missing_captions": 0}
  assert f"{broken}/a.tar/a1: cannot decode image" in caplog.text
  assert f"{broken}/a.tar/a2: no image member (.jpg, .jpeg, .png, .webp)" in caplog.text
  assert f"{broken}/b.tar/b2: cut off by the end of a truncated shard" in caplog.text


@pytest.mark.parametrize("where", ["mid_data", "header_boundary", "mid_header", "end_marker"])
def test_a_shard_cut_anywhere_keeps_only_samples_known_to_be_complete(tmp_path, where):
  rng = np.random.default_rng(2)
  path = tmp_path / "s.tar"
  members = _write_tar(path, [(f"k{i}", {"png": _image(rng, 8, 8), "txt": b"c"}) for i in range(3)])
  last = members[-1]
  end_of_members = last.offset_data + (last.size + 511) // 512 * 512
  cut, status = {
      "mid_data": (members[4].offset_data + 10, [0, 0, 1]),  # k2.png's data
      "header_boundary": (members[4].offset, [0, 1]),  # k1 may have had more members: not trusted
      "mid_header": (members[4].offset + 100, [0, 1]),
      "end_marker": (end_of_members, [0, 0, 1]),  # all members there, but no end-of-archive blocks
  }[where]
  with open(path, "r+b") as f:
    f.truncate(cut)
  index = index_shard(str(path))
  assert index.keys == [f"k{i}" for i in range(len(status))] and index.status.tolist() == status
  assert index.problem
  intact = tmp_path / "intact.tar"
  _write_tar(intact, [("k0", {"png": _image(rng, 8, 8)})])
  assert index_shard(str(intact)).problem is None and index_shard(str(intact)).status.tolist() == [0]


def test_unreadable_shards_fail_at_open_naming_the_file(tmp_path):
  (tmp_path / "notatar.tar").write_bytes(np.random.default_rng(3).bytes(4096))
  with pytest.raises(ValueError, match=r"notatar.tar' is not an uncompressed tar file"):
    TarShardSource([str(tmp_path / "notatar.tar")])
  (tmp_path / "empty.tar").write_bytes(b"")
  with pytest.raises(ValueError, match=r"No samples in the 1 tar shard\(s\)"):
    TarShardSource([str(tmp_path / "empty.tar")])


def test_the_missing_caption_policy_applies_to_tar_samples(tmp_path, caplog):
  rng = np.random.default_rng(4)
  _write_tar(tmp_path / "0.tar", [
      ("c0", {"jpg": _image(rng, 8, 8, "JPEG"), "txt": b"captioned"}),
      ("c1", {"jpg": _image(rng, 8, 8, "JPEG"), "json": json.dumps({"caption": None, "width": 8}).encode()}),
      ("c2", {"jpg": _image(rng, 8, 8, "JPEG")}),
      ("c3", {"jpg": _image(rng, 8, 8, "JPEG"), "txt": "a café".encode("latin-1")}),  # not UTF-8: replaced, named
  ])
  for policy, captions, skipped in (("empty", ["captioned", "", "", "a caf\ufffd"], 0),
                                    ("skip", ["captioned", "a caf\ufffd"], 2)):
    iterator = make_iterator(_config(tmp_path, missing_caption=policy), "train", global_batch_size=1, seed=0,
                             shuffle=False, num_epochs=1)
    assert [c for batch in iterator for c in batch["caption"]] == captions
    assert iterator.counters() == {"data/skipped": skipped, "data/missing_captions": 2}
  assert f"{tmp_path}/0.tar/c3.txt is not valid UTF-8" in caplog.text


def test_size_filters_judge_the_original_size_from_json_else_the_image(tmp_path, caplog):
  rng = np.random.default_rng(5)
  # (stored h, w; .json size fields or None). The size judged is the .json's original size, else its
  # width/height, else the image's own.
  table = {
      "s0": ((16, 16), {"original_height": 64, "original_width": 64}),  # small file, large original: kept
      "s1": ((40, 40), {"original_height": 20, "original_width": 20}),  # large file, small original: min_size
      "s2": ((40, 24), None),  # no .json: 24 < 32: min_size
      "s3": ((36, 36), None),
      "s4": ((40, 16), {"original_height": 100, "original_width": 40}),  # 2.5 > 2: max_aspect_ratio
      "s5": ((20, 20), {"height": 48, "width": 33}),
      "s6": ((33, 70), None),  # 70 / 33 > 2: max_aspect_ratio
  }
  samples = []
  for key, ((h, w), size) in table.items():
    members = {"png": _image(rng, h, w), "txt": key.encode()}
    if size is not None:
      members["json"] = json.dumps({"caption": "unused", **size}).encode()
    samples.append((key, members))
  _write_tar(tmp_path / "0.tar", samples)

  def judged(key):
    (h, w), size = table[key]
    size = size or {}
    return (size.get("original_height", size.get("height", h)), size.get("original_width", size.get("width", w)))

  unfiltered = open_source(_config(tmp_path), "train")
  assert len(unfiltered) == len(table) and unfiltered.num_filtered == {"min_size": 0, "max_aspect_ratio": 0}
  config = _config(tmp_path)
  config.webdataset.min_size, config.webdataset.max_aspect_ratio = 32, 2.0
  caplog.set_level(logging.INFO, logger="absl")
  source = open_source(config, "train")
  kept = [source[i]["caption"] for i in range(len(source))]
  assert kept == [k for k in table if min(judged(k)) >= 32 and max(judged(k)) <= 2.0 * min(judged(k))]
  assert kept == ["s0", "s3", "s5"]
  assert source.num_filtered == {"min_size": 2, "max_aspect_ratio": 2}
  assert "4 of 7 samples filtered out (min_size 32: 2, max_aspect_ratio 2.0: 2)" in caplog.text
  assert [source[i]["original_size"] for i in range(3)] == [(64, 64), None, (48, 33)]
  config.webdataset.min_size = 100
  with pytest.raises(ValueError, match="No samples .* after filtering"):
    open_source(config, "train")
  with pytest.raises(ValueError, match="data.webdataset.min_size must be an integer >= 0"):
    TarShardSource([str(tmp_path / "0.tar")], min_size=-1)
  with pytest.raises(ValueError, match="data.webdataset.max_aspect_ratio must be 0 \\(off\\) or >= 1"):
    TarShardSource([str(tmp_path / "0.tar")], max_aspect_ratio=0.5)


@pytest.mark.parametrize("shuffle", [False, True])
def test_resume_mid_shard_continues_exactly(dataset, shuffle):
  root, _ = dataset
  config = _config(root, crop="random", random_flip=True)
  it = make_iterator(config, "train", global_batch_size=2, seed=7, shuffle=shuffle)
  first = _take(it, 2)  # unshuffled: 4 of shard 0's 5 samples
  if not shuffle:
    assert list(first[1]["caption"]) == ["caption number 2", "caption number 3"]
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 7)  # on through the other shards into the second epoch
  resumed = make_iterator(config, "train", global_batch_size=2, seed=7, shuffle=shuffle)
  resumed.set_state(state)
  _assert_same_batches(_take(resumed, 7), expected)


def test_two_processes_read_disjoint_slices_that_cover_every_sample(dataset):
  root, expected = dataset
  config = _config(root)
  kwargs = dict(global_batch_size=4, seed=3, num_epochs=1, drop_remainder=False)
  single = list(make_iterator(config, "train", **kwargs, process_index=0, process_count=1))
  halves = [list(make_iterator(config, "train", **kwargs, process_index=p, process_count=2)) for p in (0, 1)]
  seen = [[c for batch in half for c in batch["caption"]] for half in halves]
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == sorted(caption for _, caption, _ in expected.values())
  for step, global_batch in enumerate(single):
    for key in global_batch:
      np.testing.assert_array_equal(np.concatenate([halves[0][step][key], halves[1][step][key]]),
                                    global_batch[key], err_msg=key)


def test_a_batch_end_to_end_has_the_right_images_captions_and_tokens(dataset):
  root, expected = dataset
  config = _config(root, image_size=8)
  config.tokenizer.kind, config.tokenizer.max_length = "shapes", 16
  batch = next(make_iterator(config, "train", global_batch_size=4, seed=0, shuffle=False))
  assert batch["image"].dtype == np.float32 and batch["image"].shape == (4, 8, 8, 3)
  assert batch["caption"].shape == (4,) and list(batch["caption"]) == [f"caption number {n}" for n in range(4)]
  assert batch["tokens"].dtype == np.int32 and batch["tokens"].shape == batch["attention_mask"].shape == (4, 16)
  for n in (0, 2):  # PNG: lossless, so the reference is exact up to float rounding
    image, _, _ = expected[f"00000.tar/{0:05d}{n:04d}"]
    with Image.open(io.BytesIO(image)) as pil:
      scale = 8 / min(pil.size)
      w, h = max(8, round(pil.width * scale)), max(8, round(pil.height * scale))
      resized = np.asarray(pil.convert("RGB").resize((w, h), Image.Resampling.BICUBIC))
    top, left = (h - 8) // 2, (w - 8) // 2
    reference = resized[top:top + 8, left:left + 8].astype(np.float64) / 127.5 - 1
    np.testing.assert_allclose(batch["image"][n], reference, atol=1e-6)


def test_batches_carry_original_size_and_crop_coords_for_micro_conditioning(tmp_path):
  rng = np.random.default_rng(6)
  # 8 px high: nothing is resized, so each output is exactly a window of the (maybe flipped) stored image.
  pixels = [rng.integers(0, 256, (8, 24 + 2 * i, 3), dtype=np.uint8) for i in range(8)]
  originals = [(100 + i, 300 + i) if i % 2 else None for i in range(8)]
  _write_tar(tmp_path / "0.tar", [
      (f"k{i}", {"png": _encode(p, "PNG"), **({"json": json.dumps(
          {"original_height": o[0], "original_width": o[1]}).encode()} if o else {"txt": b"c"})})
      for i, (p, o) in enumerate(zip(pixels, originals))])
  config = _config(tmp_path, image_size=8, crop="random", random_flip=True)
  batch = next(make_iterator(config, "train", global_batch_size=8, seed=0, shuffle=False))
  assert batch["original_size"].dtype == batch["crop_coords"].dtype == np.int32
  assert batch["original_size"].shape == batch["crop_coords"].shape == (8, 2)
  flips = []
  for i, (p, o) in enumerate(zip(pixels, originals)):
    assert tuple(batch["original_size"][i]) == (o or p.shape[:2])  # the .json's, else the decoded size
    top, left = batch["crop_coords"][i]
    got = np.round((batch["image"][i] + 1) * 127.5).astype(np.uint8)
    matches = [np.array_equal(view[top:top + 8, left:left + 8], got) for view in (p, p[:, ::-1])]
    assert top == 0 and sum(matches) == 1, (i, top, left, matches)
    flips.append(matches[1])
  assert 0 < sum(flips) < 8  # both cases were seen
