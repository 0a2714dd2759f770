"""Encode a stage-2 config's images once with its frozen first stage; write latent shards.

  python precompute_latents.py --config configs/ldm.py:VARIANT --out LATENTS [--config.x=...] \
      [--num_shards 64] [--dtype float16|float32] [--with_context] [--splits train,validation]
  python train.py --config configs/ldm.py:VARIANT --workdir RUN \
      --config.data.source=latents --config.data.path=LATENTS

Reads the config's data (any source; center crop, no flips), encodes it with
the config's first stage and writes ``ldm_jax.latents.v1`` ArrayRecord shards
and their metadata per split. Rerunning the same command keeps the shards
already written and writes the rest. Prints images per second.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from ldm_jax.apps.process_flags import setup_process
from ldm_jax.config import check_override_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/FILE.py[:VARIANTS]", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Folder for the shards and their metadata.", required=True)
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 1, "Shards per split (parallel reading; resumable units).")
_DTYPE = flags.DEFINE_enum("dtype", "float16", ["float16", "float32"], "Storage dtype of the latents.")
_WITH_CONTEXT = flags.DEFINE_bool("with_context", False, "Also store the frozen text encoder's output.")
_SPLITS = flags.DEFINE_list("splits", None, "Splits to encode (default: config.data.train_split).")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Images per encoder call (default: config.train.batch_size).")


def main(argv):
  del argv
  setup_process(_CONFIG.value)
  from ldm_jax.apps.precompute_latents import precompute

  try:
    precompute(_CONFIG.value, _OUT.value, num_shards=_NUM_SHARDS.value, dtype=_DTYPE.value,
               with_context=_WITH_CONTEXT.value, splits=tuple(_SPLITS.value or ()), batch_size=_BATCH.value)
  except (ValueError, FileNotFoundError) as e:  # bad settings and missing data: one line, no traceback
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  check_override_flags(sys.argv)
  app.run(main)
