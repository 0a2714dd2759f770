"""Config in, typed objects out: the one place a stage-2 ``ConfigDict`` is read.

Training, sampling and loading all build their model, schedule and step or
sampler settings here, so a run directory's stored config means the same
thing to each of them. Nothing here opens a file: weights come from
``ldm_jax.interop`` (published files, run directories) or
:func:`random_first_stage` (tests, benchmarks).
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from ldm_jax.data.tokenizers import tokenize
from ldm_jax.diffusion.config import SamplerConfig
from ldm_jax.diffusion.losses import check_timestep_sampling
from ldm_jax.diffusion.schedules import DiffusionSchedule, make_schedule
from ldm_jax.models.build import build_latent_diffusion
from ldm_jax.models.first_stage import make_first_stage
from ldm_jax.models.latent_diffusion import LatentDiffusion


@dataclasses.dataclass(frozen=True)
class LDMStepConfig:
  """Settings of one stage-2 train step."""

  prediction_type: str = "eps"
  loss_type: str = "l2"
  weighting: str = "none"  # none | min_snr
  timestep_sampling: str = "uniform"  # uniform | logit_normal (with timestep_loc, timestep_scale)
  timestep_loc: float = 0.0
  timestep_scale: float = 1.0
  cond_dropout: float = 0.0  # p of replacing the condition by the null one (CFG)
  drop_concat: bool = False  # whether CFG dropout also zeroes concat conditioning
  ema_decay: float = 0.9999  # 0 disables EMA
  grad_accum_steps: int = 1
  num_buckets: int = 10  # loss logged per timestep bucket


class FirstStageWeights(NamedTuple):
  """A first stage ready to freeze under a stage-2 model."""

  variables: Any
  model_config: dict
  scale_factor: float


def schedule_from_config(diffusion: ml_collections.ConfigDict) -> DiffusionSchedule:
  return make_schedule(diffusion.schedule, diffusion.timesteps, diffusion.linear_start, diffusion.linear_end)


def _text_cond_overrides(config: ml_collections.ConfigDict, tokenizer) -> dict:
  """The empty caption as *this* tokenizer encodes it (the CFG null input)."""
  if config.cond_stage.kind not in ("text", "clip") or tokenizer is None:
    return {}
  ids, mask = tokenize(tokenizer, [""], config.data.tokenizer.max_length)
  n = int(mask[0].sum())
  pad = int(ids[0, -1]) if n < ids.shape[1] else 0
  return {"empty_token_ids": tuple(int(i) for i in ids[0, :n]), "pad_token_id": pad}


def build_model(config: ml_collections.ConfigDict, first_stage_config: dict, scale_factor: float,
                tokenizer=None) -> LatentDiffusion:
  """The stage-2 model of a config, with the null caption of its tokenizer."""
  cond = dict(config.cond_stage.to_dict())
  cond.update(_text_cond_overrides(config, tokenizer))
  model = build_latent_diffusion(
      unet=config.unet, first_stage=first_stage_config, cond_stage=cond, concat=config.concat, ldm=config.ldm,
      scale_factor=scale_factor, compute_dtype=config.precision.compute_dtype, attention_impl=config.attention_impl,
  )
  model.check_consistency(config.data.image_size)
  vocab = getattr(model.cond_stage.module, "vocab_size", None)
  if tokenizer is not None and vocab is not None and len(tokenizer) > vocab:
    raise ValueError(
        f"the tokenizer has {len(tokenizer)} tokens but cond_stage.vocab_size is {vocab}: "
        f"set config.cond_stage.vocab_size >= {len(tokenizer)}"
    )
  return model


def step_config(config: ml_collections.ConfigDict) -> LDMStepConfig:
  d = config.diffusion
  check_timestep_sampling(d.get("timestep_sampling", "uniform"), d.get("timestep_scale", 1.0))
  return LDMStepConfig(
      prediction_type=d.prediction_type, loss_type=d.loss_type, weighting=d.weighting, cond_dropout=d.cond_dropout,
      drop_concat=d.drop_concat, ema_decay=config.ema.decay, grad_accum_steps=config.train.grad_accum_steps,
      # Runs saved before these keys existed sampled uniformly.
      timestep_sampling=d.get("timestep_sampling", "uniform"), timestep_loc=d.get("timestep_loc", 0.0),
      timestep_scale=d.get("timestep_scale", 1.0),
  )


def sampler_config(config: ml_collections.ConfigDict) -> SamplerConfig:
  s = config.sample
  return SamplerConfig(
      sampler=s.sampler, num_steps=s.num_steps, timestep_spacing=s.timestep_spacing, steps_offset=s.steps_offset,
      prediction_type=config.diffusion.prediction_type,
      guidance_interval=tuple(s.get("guidance_interval", ())) or None,  # runs saved before it existed: every step
  )


def example_inputs(model: LatentDiffusion, config: ml_collections.ConfigDict) -> dict:
  """Zero-valued conditioning inputs of one example, as the step sees them
  (only their shapes matter: they size the initialised networks)."""
  example = {}
  if model.cond_key == "tokens":
    example["tokens"] = np.zeros((1, config.data.tokenizer.max_length), np.int32)
  elif model.cond_key == "label":
    example["label"] = np.zeros((1,), np.int32)
  elif model.cond_key == "layout_tokens":
    example["layout_tokens"] = model.cond_stage.unconditional(np.zeros((1, 1), np.int32))
  if model.use_label_emb:
    example["label"] = np.zeros((1,), np.int32)
  size = config.data.image_size
  if model.concat_kind == "segmentation":
    example["segmentation"] = np.zeros((1, size, size), np.int32)
  return model.derive_inputs(example, np.zeros((1, size, size, 3), np.float32))


def random_first_stage(section: ml_collections.ConfigDict, image_size: int, *,
                       abstract: bool = False) -> FirstStageWeights:
  """An untrained first stage from ``section.model`` (tests and benchmarks only).

  ``abstract=True`` gives its variables as ``jax.ShapeDtypeStruct``s: nothing
  is computed, enough to lower (``jax.export``) programs that use it.
  """
  model_config = section.model.to_dict()
  model = make_first_stage(model_config)
  x = np.zeros((1, image_size, image_size, 3), np.float32)
  # Initialise through encode and decode so both halves get parameters.
  init = lambda k: model.init(k, x, method=_encode_decode)  # noqa: E731
  variables = jax.eval_shape(init, jax.random.key(0)) if abstract else jax.jit(init)(jax.random.key(0))
  return FirstStageWeights(variables, model_config, 1.0)


def _encode_decode(module, x):
  z = module.encode(x)
  return module.decode(z if isinstance(z, jax.Array) else z.mean)  # a VQ's latent is an array (with a .mean method)
