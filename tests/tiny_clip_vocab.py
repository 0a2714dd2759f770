"""A tiny CLIP BPE vocabulary for tests: single letters, letters + "</w>"
and a few merges ("red", "cat"), as the files CLIPTokenizer reads."""

import json
import pathlib

LETTERS = "abcdefghijklmnopqrstuvwxyz"
MERGES = (("r", "e"), ("re", "d</w>"), ("c", "a"), ("ca", "t</w>"))


def write_clip_vocab(folder: pathlib.Path) -> dict[str, int]:
  """Writes ``vocab.json`` and ``merges.txt`` into ``folder``; returns the vocabulary."""
  vocab = {c: i for i, c in enumerate(LETTERS)}
  vocab.update({c + "</w>": len(LETTERS) + i for i, c in enumerate(LETTERS)})
  for a, b in MERGES:
    vocab[a + b] = len(vocab)
  vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "vocab.json").write_text(json.dumps(vocab))
  (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in MERGES) + "\n")
  return vocab
