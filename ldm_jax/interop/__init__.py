"""Weights in and out: the one loading surface (:mod:`ldm_jax.interop.load`),
readers and converters of published formats (diffusers, original SD/LDM
files, OpenCLIP, LPIPS, Inception, CLIP), our orbax pipeline format, and
export.

The names below are imported on first use, so that importing one light
module (e.g. ``ldm_jax.interop.diffusers_unet``, a config translation) does
not import orbax, transformers and the data pipeline with the loaders.
"""

import importlib

_EXPORTS = {
    "first_stage_for": "ldm_jax.interop.load",
    "frozen_cond_variables": "ldm_jax.interop.load",
    "load_first_stage": "ldm_jax.interop.load",
    "load_pipeline": "ldm_jax.interop.load",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'ldm_jax.interop' has no attribute {name!r}")
