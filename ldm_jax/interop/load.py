"""The one loading surface: a run directory or a published file in, a model
or pipeline out.

- :func:`load_pipeline`: a ready-to-sample ``LDMPipeline`` from a stage-2 run
  directory (its latest checkpoint; EMA weights by default), a pipeline
  converted to our orbax format, a diffusers folder or an original Stable
  Diffusion / LDM file.
- :func:`load_first_stage`: an autoencoder from a stage-1 run directory, a
  stage-2 run's ``first_stage`` copy, a diffusers folder, an original SD /
  LDM file or the paper's first-stage checkpoints.
- :func:`first_stage_for` / :func:`frozen_cond_variables`: the pretrained
  parts a stage-2 config names, for the trainer.
"""

import os

import jax
import ml_collections

from ldm_jax.assembly import FirstStageWeights, random_first_stage
from ldm_jax.interop import orbax_format
from ldm_jax.interop.pretrained import load_pretrained_pipeline
from ldm_jax.interop.published_first_stage import is_published_first_stage, load_published_first_stage
from ldm_jax.interop.run_dirs import frozen_cond_variables, is_run_dir, load_first_stage_run, load_ldm_run
from ldm_jax.models.autoencoder import AutoencoderKL
from ldm_jax.models.first_stage import make_first_stage
from ldm_jax.models.vq import VQModel
from ldm_jax.pipeline import LDMPipeline
from ldm_jax.training.first_stage_copy import is_first_stage_copy, load_first_stage_copy

__all__ = ["first_stage_for", "frozen_cond_variables", "is_run_dir", "load_first_stage", "load_pipeline"]


def load_pipeline(path: str, *, use_ema: bool = True, mesh=None, compute_dtype: str | None = None) -> LDMPipeline:
  """Loads a model for sampling from ``path`` (see module docstring)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path!r} does not exist")
  if is_run_dir(path):
    return load_ldm_run(path, use_ema=use_ema, mesh=mesh, compute_dtype=compute_dtype)
  if not use_ema and os.path.isdir(path):  # converted and diffusers folders keep one UNet
    raise ValueError(f"{path} holds one set of weights: use_ema=False (--no_ema) applies to training runs "
                     "and to original files with both the raw and the EMA UNet")
  if orbax_format.is_orbax_pipeline(path):
    return orbax_format.load(path, mesh=mesh, compute_dtype=compute_dtype)
  return load_pretrained_pipeline(path, mesh=mesh, compute_dtype=compute_dtype, use_ema=use_ema)


def load_first_stage(
    path: str | os.PathLike, *, model_config: dict | None = None, step: int | None = None,
    sharding: jax.sharding.Sharding | None = None, config: str | dict | None = None,
) -> tuple[AutoencoderKL | VQModel, dict, float, dict]:
  """``(model, variables, scale_factor, model_config)`` of a trained first stage.

  Args:
    path: a stage-1 run directory (or its ``checkpoints`` folder), a
      stage-2 run's ``first_stage`` copy, or a published checkpoint (see
      ``ldm_jax.interop.published_first_stage``).
    model_config: ``{kind, embed_dim, n_embed, ddconfig}`` to build instead
      of the stored one (e.g. a stage-2 config's ``first_stage``); arrays
      that do not fit it are named in one error.
    step: the checkpoint to read (default: the latest).
    sharding: where to place the weights (default: the first local device).
    config: a published file's reference YAML (default: the one beside it).
  """
  path = os.path.expanduser(os.fspath(path))
  if not is_run_dir(path) and (os.path.isfile(path) or is_published_first_stage(path)):
    if model_config is not None or step is not None:
      raise ValueError(f"{path} is a published checkpoint: model_config and step apply to run directories")
    variables, section, scale = load_published_first_stage(path, config=config)
    return make_first_stage(section), variables, scale, section
  if os.path.isdir(path) and is_first_stage_copy(os.fspath(path)) and model_config is None and step is None:
    return load_first_stage_copy(os.fspath(path))
  return load_first_stage_run(path, model_config=model_config, step=step, sharding=sharding)


def first_stage_for(config: ml_collections.ConfigDict) -> FirstStageWeights:
  """The frozen first stage that ``config.first_stage`` names.

  ``checkpoint`` names a stage-1 run directory or a published checkpoint
  (with ``config``, its reference YAML, where it is not beside the file);
  ``random_init=True`` with a ``model`` section gives an untrained one
  (tests and benchmarks only).
  """
  section = config.first_stage
  if section.checkpoint:
    _, variables, scale, model_config = load_first_stage(section.checkpoint, config=section.get("config") or None)
    return FirstStageWeights(variables, model_config, scale)
  if section.get("random_init", False) or section.model.get("kind") == "identity":  # pixel space: nothing to load
    return random_first_stage(section, config.data.image_size)
  raise ValueError(
      "config.first_stage.checkpoint is empty: train a first stage first "
      "(python train.py --config configs/autoencoder.py:... --workdir RUN) and set "
      "--config.first_stage.checkpoint=RUN"
  )
