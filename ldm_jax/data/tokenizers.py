"""Caption tokenizers (from ``transformers``; tokenizers only, no models).

- ``"clip"``: a CLIP BPE tokenizer from a checkpoint's own tokenizer folder
  (Stable Diffusion's ``tokenizer/``: vocab.json + merges.txt).
- ``"bert"``: a BERT WordPiece tokenizer folder (the LDM paper's txt2img
  model uses bert-base-uncased).
- ``"shapes"``: a word-level BERT-style tokenizer over the captioned-shapes
  vocabulary; built here, so it needs no download, and saved with
  ``save_pretrained`` so a checkpoint can carry it.

Files are always loaded with ``from_pretrained(folder)``: in transformers 5
``CLIPTokenizer(vocab_file=...)`` and ``BertTokenizerFast(vocab_file=...)``
silently ignore their files and map every token to unknown.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import ml_collections
import numpy as np
from absl import logging
from transformers import BertTokenizerFast, CLIPTokenizer, PreTrainedTokenizerBase

from ldm_jax.data.captioned_shapes.vocabulary import caption_words

TOKENIZER_KINDS = ("clip", "bert", "shapes")
_warned_about_truncation = False  # Once per process: a long dataset would flood the log.
SHAPES_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def build_shapes_tokenizer(save_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
  """Word-level tokenizer: the special tokens, then every caption word (sorted)."""
  words = list(SHAPES_SPECIAL_TOKENS) + caption_words()
  tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(words)}, do_lower_case=True)
  if save_dir is not None:
    tokenizer.save_pretrained(str(save_dir))
  return tokenizer


def _existing_folder(path: str, kind: str) -> str:
  if not path:
    raise ValueError(
        f"config.data.tokenizer.path is empty; tokenizer {kind!r} loads from a folder "
        "(for Stable Diffusion, the checkpoint's tokenizer/ folder)."
    )
  folder = Path(path).expanduser()
  if not folder.is_dir():
    raise FileNotFoundError(f"Tokenizer folder {str(folder)!r} (kind {kind!r}) does not exist.")
  return str(folder)


def load_tokenizer(tokenizer_config: ml_collections.ConfigDict) -> PreTrainedTokenizerBase | None:
  """The configured tokenizer, or None when ``kind`` is empty.

  For ``"shapes"`` a ``path`` holding a saved tokenizer is loaded; a path
  without one receives a freshly built tokenizer; no path builds in memory.
  """
  kind, path = tokenizer_config.kind, tokenizer_config.path
  if not kind:
    return None
  if kind == "clip":
    return CLIPTokenizer.from_pretrained(_existing_folder(path, kind))
  if kind == "bert":
    return BertTokenizerFast.from_pretrained(_existing_folder(path, kind))
  if kind == "shapes":
    if path and (Path(path).expanduser() / "tokenizer.json").is_file():
      return BertTokenizerFast.from_pretrained(str(Path(path).expanduser()))
    return build_shapes_tokenizer(Path(path).expanduser() if path else None)
  raise ValueError(f"Unknown tokenizer kind {kind!r}; expected one of {TOKENIZER_KINDS}.")


def tokenize(
    tokenizer: PreTrainedTokenizerBase, captions: Sequence[str], max_length: int = 77
) -> tuple[np.ndarray, np.ndarray]:
  """(ids, attention_mask), both int32 (B, max_length): padded and truncated.

  Truncation keeps the closing special token (EOS / [SEP]), as the
  reference models were trained. The first truncated caption is logged.
  """
  captions = [str(c) for c in captions]
  encoded = tokenizer(
      captions, padding="max_length", truncation=True, max_length=max_length, return_tensors="np"
  )
  ids = encoded["input_ids"].astype(np.int32)
  mask = encoded["attention_mask"].astype(np.int32)
  # Only a caption that fills every position can have been cut.
  full = [captions[i] for i in np.flatnonzero(mask.sum(axis=1) == max_length)]
  global _warned_about_truncation
  if full and not _warned_about_truncation:
    lengths = [len(x) for x in tokenizer(full, truncation=False)["input_ids"]]
    longest = int(np.argmax(lengths))
    if lengths[longest] > max_length:
      _warned_about_truncation = True
      logging.warning(
          "Caption truncated from %d to %d tokens (logged once): %r", lengths[longest], max_length, full[longest]
      )
  return ids, mask
