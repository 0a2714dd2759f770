"""Weights in and out: the one loading surface (:mod:`ldm_jax.interop.load`),
readers and converters of published formats (diffusers, original SD/LDM
files, OpenCLIP, LPIPS, Inception, CLIP), our orbax pipeline format, and
export."""

from ldm_jax.interop.load import first_stage_for, frozen_cond_variables, load_first_stage, load_pipeline

__all__ = ["first_stage_for", "frozen_cond_variables", "load_first_stage", "load_pipeline"]
