"""``make_iterator``: the configured dataset as a checkpointable stream of batches.

Built on grain's ``MapDataset``: a random-access index space is what makes
shuffling global, per-process slicing exact, per-example randomness a pure
function of (seed, position), and resuming exact -- all without a
TensorFlow runtime. The order of operations:

  source -> shuffle (fresh order each epoch) -> repeat -> decode + transform
  (random_map) -> this process's slice -> [worker processes] -> skip bad
  records, batch, tokenise (``InputIterator``, main process)
"""

from __future__ import annotations

import grain
import jax
import ml_collections
from absl import flags

from ldm_jax.data.batching import InputIterator
from ldm_jax.data.config import MISSING_CAPTION_POLICIES, validate_image_size
from ldm_jax.data.preprocess import Preprocess
from ldm_jax.data.sharding import ProcessSlice
from ldm_jax.data.skipping import SafeRead
from ldm_jax.data.sources import has_captions, open_source
from ldm_jax.data.tokenizers import load_tokenizer
from ldm_jax.data.transforms import Geometry

# Elements each worker process keeps ready; a few per worker hides latency.
_PER_WORKER_BUFFER = 8


def make_iterator(
    data_config: ml_collections.ConfigDict,
    split: str,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    shuffle: bool = True,
    num_epochs: int | None = None,
    tokenizer=None,
    drop_remainder: bool = True,
) -> InputIterator:
  """Batches of ``split`` for this process (global batch / process count each).

  ``num_epochs=None`` repeats forever. ``tokenizer`` defaults to the one
  ``data_config.tokenizer`` names (none when its ``kind`` is empty).
  Everything that can be checked is checked here, before the first batch.
  """
  validate_image_size(data_config.image_size)
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed must be in [0, 2**32), got {seed}.")
  # .get: configs saved by runs older than these keys lack them.
  missing_caption = data_config.get("missing_caption", "empty")
  if missing_caption not in MISSING_CAPTION_POLICIES:
    raise ValueError(f"data.missing_caption must be one of {MISSING_CAPTION_POLICIES}, got {missing_caption!r}.")
  max_skip_fraction = data_config.get("max_skip_fraction", 0.5)
  if not 0 <= max_skip_fraction <= 1:
    raise ValueError(f"data.max_skip_fraction must be in [0, 1], got {max_skip_fraction!r}.")
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  geometry = Geometry(data_config.image_size, data_config.crop, data_config.random_flip)
  if tokenizer is None:
    tokenizer = load_tokenizer(data_config.tokenizer)
  if tokenizer is not None and not has_captions(data_config):
    raise ValueError("A tokenizer is configured but the dataset has no captions: set config.data.caption_key.")

  source = open_source(data_config, split)
  if len(source) == 0:
    raise ValueError(f"Split {split!r} of {source!r} is empty.")
  dataset = grain.MapDataset.source(SafeRead(source))
  if shuffle:
    dataset = dataset.shuffle(seed=seed)  # Reshuffles each epoch (seed + epoch).
  dataset = dataset.repeat(num_epochs)
  dataset = dataset.random_map(Preprocess(geometry, missing_caption), seed=seed)
  dataset = ProcessSlice(dataset, global_batch_size, process_index, process_count)
  elements = dataset.to_iter_dataset(grain.ReadOptions(num_threads=data_config.num_threads))
  if data_config.num_workers > 0:
    # grain's worker processes read absl flags; outside absl.app.run nobody parsed them.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    elements = elements.mp_prefetch(
        grain.MultiprocessingOptions(
            num_workers=data_config.num_workers, per_worker_buffer_size=_PER_WORKER_BUFFER
        )
    )
  return InputIterator(
      iter(elements),
      batch_size=global_batch_size // process_count,
      drop_remainder=drop_remainder,
      tokenizer=tokenizer,
      max_length=data_config.tokenizer.max_length,
      max_skip_fraction=max_skip_fraction,
  )
