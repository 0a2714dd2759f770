"""Tokenizers from local folders: known words map to known ids."""

import logging

import ml_collections
import numpy as np
import pytest
from tiny_clip_vocab import write_clip_vocab

from ldm_jax.data import captioned_shapes as cs
from ldm_jax.data import tokenizers
from ldm_jax.data.tokenizers import SHAPES_SPECIAL_TOKENS, build_shapes_tokenizer, load_tokenizer, tokenize


def _config(kind, path="", max_length=77):
  return ml_collections.ConfigDict({"kind": kind, "path": str(path), "max_length": max_length})


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
  """A tiny CLIP BPE vocabulary: single letters, letters + "</w>", a few merges."""
  folder = tmp_path_factory.mktemp("clip_tokenizer")
  return folder, write_clip_vocab(folder)


def test_clip_tokenizer_from_a_local_folder(clip_folder):
  folder, vocab = clip_folder
  tokenizer = load_tokenizer(_config("clip", folder))
  ids, mask = tokenize(tokenizer, ["Red cat", "red"], max_length=6)
  bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
  np.testing.assert_array_equal(ids[0][:4], [bos, vocab["red</w>"], vocab["cat</w>"], eos])
  np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
  assert ids.dtype == mask.dtype == np.int32


def test_bert_tokenizer_from_a_local_folder(tmp_path):
  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "##s"]
  (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
  ids, mask = tokenize(load_tokenizer(_config("bert", tmp_path)), ["A red Circles!"], max_length=8)
  np.testing.assert_array_equal(ids[0], [2, 5, 6, 7, 8, 1, 3, 0])  # "!" is unknown
  np.testing.assert_array_equal(mask[0], [1, 1, 1, 1, 1, 1, 1, 0])


def test_shapes_tokenizer_knows_every_caption_word_and_survives_a_round_trip(tmp_path):
  tokenizer = build_shapes_tokenizer()
  rng = np.random.default_rng(0)
  captions = [cs.caption(cs.sample_scene(rng, split)[0]) for split in ("train", "test") * 20]
  ids, mask = tokenize(tokenizer, captions, max_length=32)
  words = list(SHAPES_SPECIAL_TOKENS) + cs.caption_words()
  for row, m, text in zip(ids, mask, captions):
    expected = [words.index(w) for w in text.replace(",", " ,").split()]
    np.testing.assert_array_equal(row[m == 1], [words.index("[CLS]")] + expected + [words.index("[SEP]")])
  saved = tmp_path / "shapes_tokenizer"
  first = load_tokenizer(_config("shapes", saved))  # builds and saves
  assert (saved / "tokenizer.json").is_file()
  reloaded = load_tokenizer(_config("shapes", saved))  # loads the saved one
  np.testing.assert_array_equal(tokenize(reloaded, captions, 32)[0], ids)
  np.testing.assert_array_equal(tokenize(first, captions, 32)[0], ids)


def test_truncation_keeps_the_end_token_and_warns_once(caplog, monkeypatch):
  monkeypatch.setattr(tokenizers, "_warned_about_truncation", False)
  tokenizer = build_shapes_tokenizer()
  long = "a large red circle to the left of a small blue square"
  with caplog.at_level(logging.WARNING):
    ids, mask = tokenize(tokenizer, [long, "a red circle"], max_length=6)
    tokenize(tokenizer, [long], max_length=6)
  sep = tokenizer.convert_tokens_to_ids("[SEP]")
  assert ids[0][-1] == sep and mask[0].sum() == 6
  assert tokenizer.convert_ids_to_tokens(ids[0][1:5].tolist()) == ["a", "large", "red", "circle"]
  warnings = [r for r in caplog.records if "truncated" in r.getMessage()]
  assert len(warnings) == 1 and "from 14 to 6 tokens" in warnings[0].getMessage()


def test_bad_tokenizer_settings_are_named(tmp_path):
  assert load_tokenizer(_config("")) is None
  with pytest.raises(ValueError, match="Unknown tokenizer kind 'gpt2'"):
    load_tokenizer(_config("gpt2"))
  with pytest.raises(FileNotFoundError, match="Tokenizer folder .*missing.* \\(kind 'clip'\\) does not exist"):
    load_tokenizer(_config("clip", tmp_path / "missing"))
  with pytest.raises(ValueError, match="tokenizer.path is empty"):
    load_tokenizer(_config("bert"))
