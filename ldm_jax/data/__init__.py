"""Input data: the built-in captioned-shapes dataset, grain pipelines,
image-folder / ArrayRecord / TFDS sources, and caption tokenizers.

Knows nothing of models. Names below are imported on first use, so that
grain's worker processes, which import this package to unpickle the
pipeline, do not pay for transformers or TFDS when they do not need them.
"""

import importlib

_EXPORTS = {
    "default_data_config": "ldm_jax.data.config",
    "validate_image_size": "ldm_jax.data.config",
    "make_iterator": "ldm_jax.data.pipeline",
    "InputIterator": "ldm_jax.data.batching",
    "to_global_array": "ldm_jax.data.sharding",
    "load_tokenizer": "ldm_jax.data.tokenizers",
    "tokenize": "ldm_jax.data.tokenizers",
    "build_shapes_tokenizer": "ldm_jax.data.tokenizers",
    "build_captioned_shapes": "ldm_jax.data.captioned_shapes",
    "prepare_folder": "ldm_jax.data.prepare",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'ldm_jax.data' has no attribute {name!r}")
