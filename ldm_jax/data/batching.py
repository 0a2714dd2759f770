"""The iterator ``make_iterator`` returns: skips bad records, batches, tokenises.

It runs in the main process, after grain's worker processes, so that the
count of skipped records is complete, batches have the same contents
whatever the number of workers, and the tokenizer never has to be pickled.
Its state (JSON-serialisable) is grain's plus the skip count; grain's Orbax
checkpoint handler (``grain.checkpoint.CheckpointSave``) accepts it.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np
from absl import logging

from ldm_jax.data.skipping import ERROR_KEY
from ldm_jax.data.tokenizers import tokenize
from ldm_jax.data.transforms import to_unit_range


class InputIterator(grain.DatasetIterator):
  """Yields dicts of NumPy arrays holding this process's share of each batch.

  ``image`` float32 (B, H, W, 3) in [-1, 1]; ``caption`` str (B,);
  ``tokens``/``attention_mask`` int32 (B, L) with a tokenizer; ``label``,
  ``num_objects`` int32 (B,); ``boxes`` float32 (B, 3, 4); ``box_labels``
  int32 (B, 3); ``segmentation`` uint8 (B, H, W) -- whichever the source has.
  """

  def __init__(
      self,
      parent: grain.DatasetIterator,
      batch_size: int,
      drop_remainder: bool = True,
      tokenizer: Any = None,
      max_length: int = 77,
  ):
    super().__init__(parent)
    self._batch_size = batch_size
    self._drop_remainder = drop_remainder
    self._tokenizer = tokenizer
    self._max_length = max_length
    self.num_skipped = 0  # Records that could not be read, since the start of training.

  def __next__(self) -> dict[str, np.ndarray]:
    examples = []
    while len(examples) < self._batch_size:
      try:
        example = next(self._parent)
      except StopIteration:
        if examples and not self._drop_remainder:
          break
        raise
      if ERROR_KEY in example:
        self.num_skipped += 1
        logging.warning("Skipping unreadable record (%d so far): %s", self.num_skipped, example[ERROR_KEY])
        continue
      examples.append(example)
    return self._collate(examples)

  def _collate(self, examples: list[dict]) -> dict[str, np.ndarray]:
    batch = {key: np.stack([e[key] for e in examples]) for key in examples[0] if key != "caption"}
    batch["image"] = to_unit_range(batch["image"])
    if "caption" in examples[0]:
      captions = [e["caption"] for e in examples]
      batch["caption"] = np.asarray(captions, dtype=str)
      if self._tokenizer is not None:
        batch["tokens"], batch["attention_mask"] = tokenize(self._tokenizer, captions, self._max_length)
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"pipeline": self._parent.get_state(), "num_skipped": self.num_skipped}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["pipeline"])
    self.num_skipped = int(state["num_skipped"])
