"""The iterator ``make_iterator`` returns: skips bad records, batches, tokenises.

It runs in the main process, after grain's worker processes, so that the
counts of skipped records and missing captions are complete, batches have
the same contents whatever the number of workers, and the tokenizer never
has to be pickled. Its state (JSON-serialisable) is grain's plus the
counts; grain's Orbax checkpoint handler (``grain.checkpoint.CheckpointSave``)
accepts it.
"""

from __future__ import annotations

import collections
from typing import Any

import grain
import numpy as np
from absl import logging

from ldm_jax.data.skipping import ERROR_KEY, MISSING_CAPTION_KEY, TooManySkipsError
from ldm_jax.data.tokenizers import tokenize
from ldm_jax.data.transforms import to_unit_range

# Records over which data.max_skip_fraction is measured: enough that a few bad
# files in a row do not stop a run, few enough that a dead dataset stops in seconds.
SKIP_WINDOW = 200
# Images without a caption are named in the first few warnings only: an
# uncaptioned dataset (for an autoencoder, say) is legitimate.
_NAMED_MISSING_CAPTIONS = 5


class InputIterator(grain.DatasetIterator):
  """Yields dicts of NumPy arrays holding this process's share of each batch.

  ``image`` float32 (B, H, W, 3) in [-1, 1]; ``caption`` str (B,);
  ``tokens``/``attention_mask`` int32 (B, L) with a tokenizer; ``label``,
  ``num_objects`` int32 (B,); ``boxes`` float32 (B, O, 4); ``box_labels``
  int32 (B, O) (O: 3 for the shapes dataset, else ``data.conditioning.layout_max_objects``);
  ``segmentation`` uint8 (B, H, W) (int32 from 16-bit label maps) -- whichever the source
  has; and as ``data.conditioning`` asks, ``low_res`` float32 (B, H / f, W / f, 3) in
  [-1, 1] and ``mask`` float32 (B, H, W, 1), 1 = hole.
  """

  def __init__(
      self,
      parent: grain.DatasetIterator,
      batch_size: int,
      drop_remainder: bool = True,
      tokenizer: Any = None,
      max_length: int = 77,
      max_skip_fraction: float = 0.5,
  ):
    super().__init__(parent)
    self._batch_size = batch_size
    self._drop_remainder = drop_remainder
    self._tokenizer = tokenizer
    self._max_length = max_length
    self._max_skip_fraction = max_skip_fraction
    self.num_skipped = 0  # Records that could not be used, since the start of training.
    self.num_missing_captions = 0  # Images without a caption (trained with "" or skipped).
    self._window = collections.deque(maxlen=SKIP_WINDOW)  # 1 per skipped record among the last read
    self._recent_errors = collections.deque(maxlen=3)

  def __next__(self) -> dict[str, np.ndarray]:
    examples = []
    while len(examples) < self._batch_size:
      try:
        example = next(self._parent)
      except StopIteration:
        if examples and not self._drop_remainder:
          break
        raise
      self._window.append(ERROR_KEY in example)
      if MISSING_CAPTION_KEY in example:
        self._count_missing_caption(example.pop(MISSING_CAPTION_KEY), skipped=ERROR_KEY in example)
      if ERROR_KEY in example:
        self._skip(example[ERROR_KEY])
        continue
      examples.append(example)
    return self._collate(examples)

  def _skip(self, message: str) -> None:
    self.num_skipped += 1
    self._recent_errors.append(message)
    logging.warning("Skipping record (%d so far): %s", self.num_skipped, message)
    bad = sum(self._window)
    if len(self._window) == SKIP_WINDOW and bad > self._max_skip_fraction * SKIP_WINDOW:
      raise TooManySkipsError(
          f"{bad} of the last {SKIP_WINDOW} records could not be used (data.max_skip_fraction is "
          f"{self._max_skip_fraction}); is the dataset readable? The last ones: " + "; ".join(self._recent_errors)
      )

  def _count_missing_caption(self, where: str, skipped: bool) -> None:
    self.num_missing_captions += 1
    if skipped:  # _skip names it
      return
    if self.num_missing_captions <= _NAMED_MISSING_CAPTIONS:
      logging.warning("%s has no caption file; training it with the empty caption (data.missing_caption='empty')%s",
                      where, "; further ones are only counted (data/missing_captions in metrics.jsonl)"
                      if self.num_missing_captions == _NAMED_MISSING_CAPTIONS else "")

  def counters(self) -> dict[str, int]:
    """Counts since the start of training, for the metrics log."""
    return {"data/skipped": self.num_skipped, "data/missing_captions": self.num_missing_captions}

  def _collate(self, examples: list[dict]) -> dict[str, np.ndarray]:
    batch = {key: np.stack([e[key] for e in examples]) for key in examples[0] if key != "caption"}
    if "image" in batch:  # precomputed latents (data.source=latents) carry none
      batch["image"] = to_unit_range(batch["image"])
    if "caption" in examples[0]:
      captions = [e["caption"] for e in examples]
      batch["caption"] = np.asarray(captions, dtype=str)
      if self._tokenizer is not None:
        batch["tokens"], batch["attention_mask"] = tokenize(self._tokenizer, captions, self._max_length)
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"pipeline": self._parent.get_state(), "num_skipped": self.num_skipped,
            "num_missing_captions": self.num_missing_captions}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["pipeline"])
    self.num_skipped = int(state["num_skipped"])
    self.num_missing_captions = int(state.get("num_missing_captions", 0))  # absent before it was counted
