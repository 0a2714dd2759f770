"""Every setting a training run reads, checked before anything heavy starts.

A bad value fails in about a second with one line naming the key, the
value and what is allowed, instead of a traceback after a minute of
dataset building, weight loading and compiling.
"""

import math
import os

import ml_collections

from ldm_jax.config import ConfigError
from ldm_jax.data.config import SOURCES
from ldm_jax.data.tar_shards import resolve_tar_shards
from ldm_jax.diffusion.losses import LOSS_TYPES, WEIGHTINGS, check_timestep_sampling
from ldm_jax.diffusion.parameterization import canonical_prediction_type
from ldm_jax.diffusion.schedules import make_beta_schedule
from ldm_jax.parallel.mesh import AXES, BATCH_AXES, resolve_shape
from ldm_jax.training.optim import LAMBDA_SCHEDULES, LR_SCHEDULES

PRETRAINED_WEIGHTS = ("ema", "raw")
EXTRA_IN_CHANNELS = ("error", "zeros")


def check_training_config(config: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1) -> None:
  """Raises :class:`ConfigError` for the first setting that cannot work."""
  _check_loop(config.train)
  _check_optimizer(config.optim)
  _require(isinstance(config.seed, int) and config.seed >= 0, "seed", config.seed, "an integer >= 0")
  _check_data(config.data)
  _check_mesh(config, num_devices, num_processes)
  if config.stage == "ldm":
    pretrained = config.get("pretrained")
    if pretrained is not None:
      check_pretrained_config(pretrained)
    if pretrained is None or not pretrained.path:  # else the first stage comes with the published model
      _check_first_stage(config.first_stage)
    _check_diffusion(config.diffusion)


def _require(ok: bool, key: str, value, allowed: str) -> None:
  if not ok:
    raise ConfigError(f"config.{key}={value!r} is invalid: expected {allowed}")


def _positive_int(section: ml_collections.ConfigDict, prefix: str, *keys: str) -> None:
  for key in keys:
    if key in section:
      value = section[key]
      _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, f"{prefix}.{key}", value,
               "an integer >= 1")


def _check_loop(train: ml_collections.ConfigDict) -> None:
  _positive_int(train, "train", "num_steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints",
                "grad_accum_steps", "eval_batch_size")
  for key in ("sample_every", "eval_every"):
    if key in train:
      _require(isinstance(train[key], int) and train[key] >= 0, f"train.{key}", train[key], "an integer >= 0 (0: off)")
  accum = train.get("grad_accum_steps", 1)
  _require(train.batch_size % accum == 0, "train.batch_size", train.batch_size,
           f"a multiple of train.grad_accum_steps={accum}")


def _check_optimizer(optim: ml_collections.ConfigDict) -> None:
  lr = optim.learning_rate
  _require(isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0, "optim.learning_rate", lr,
           "a finite number > 0")
  if "schedule" in optim:
    _require(optim.schedule in LR_SCHEDULES, "optim.schedule", optim.schedule, f"one of {LR_SCHEDULES}")
  if "warmup_steps" in optim:
    _require(optim.warmup_steps >= 0, "optim.warmup_steps", optim.warmup_steps, "an integer >= 0")
  if optim.get("schedule") in LAMBDA_SCHEDULES:
    _require(optim.warmup_steps >= 1, "optim.warmup_steps", optim.warmup_steps,
             f"an integer >= 1 for the {optim.schedule} schedule")
    _require(optim.cycle_length > optim.warmup_steps, "optim.cycle_length", optim.cycle_length,
             f"more than optim.warmup_steps={optim.warmup_steps}")


def _check_data(data: ml_collections.ConfigDict) -> None:
  _require(data.source in SOURCES, "data.source", data.source, f"one of {SOURCES}")
  _positive_int(data, "data", "image_size")
  if data.source in ("folder", "array_record", "latents"):
    _require(bool(data.path), "data.path", data.path, f"a path to the dataset (source {data.source!r})")
    _require(bool(data.path) and os.path.exists(data.path.split(",")[0]), "data.path", data.path,
             "an existing path")
  if data.source == "webdataset":
    _require(bool(data.path), "data.path", data.path, "tar shards, e.g. 'shards/{00000..00127}.tar'")
    try:
      resolve_tar_shards(data.path, data.train_split)  # globbing only: cheap
    except (FileNotFoundError, ValueError) as e:
      raise ConfigError(f"config.data.path={data.path!r}: {e}") from None
    section = data.get("webdataset")
    if section is not None:
      _require(isinstance(section.min_size, int) and section.min_size >= 0, "data.webdataset.min_size",
               section.min_size, "an integer >= 0 (0: off)")
      _require(section.max_aspect_ratio == 0 or section.max_aspect_ratio >= 1, "data.webdataset.max_aspect_ratio",
               section.max_aspect_ratio, "0 (off) or a ratio >= 1")


def _check_mesh(config: ml_collections.ConfigDict, num_devices: int, num_processes: int) -> None:
  try:
    shape = dict(zip(AXES, resolve_shape(config.mesh.shape, num_devices)))
  except ValueError as e:
    raise ConfigError(f"config.mesh.shape: {e}") from None
  data_parallel = math.prod(shape[a] for a in BATCH_AXES)
  batch = config.train.batch_size
  _require(batch % data_parallel == 0, "train.batch_size", batch,
           f"a multiple of the data-parallel size {data_parallel} (mesh data={shape['data']} x fsdp={shape['fsdp']})")
  _require(batch % num_processes == 0, "train.batch_size", batch, f"a multiple of the process count {num_processes}")


def check_pretrained_config(p: ml_collections.ConfigDict) -> None:
  for key in ("path", "unet_from", "tokenizer"):
    if p.get(key):
      _require(os.path.exists(p[key]), f"pretrained.{key}", p[key], "an existing file or folder")
  _require(p.weights in PRETRAINED_WEIGHTS, "pretrained.weights", p.weights, f"one of {PRETRAINED_WEIGHTS}")
  _require(p.extra_in_channels in EXTRA_IN_CHANNELS, "pretrained.extra_in_channels", p.extra_in_channels,
           f"one of {EXTRA_IN_CHANNELS}")
  if p.prediction_type:
    try:
      canonical_prediction_type(p.prediction_type)
    except ValueError as e:
      raise ConfigError(f"config.pretrained.prediction_type: {e}") from None


def _check_first_stage(section: ml_collections.ConfigDict) -> None:
  if section.get("model") is not None and section.model.get("kind") == "identity":
    return  # pixel space (LDM-1): no weights
  if section.checkpoint:
    _require(os.path.exists(section.checkpoint), "first_stage.checkpoint", section.checkpoint,
             "an existing stage-1 run directory or published checkpoint")
  else:
    _require(bool(section.get("random_init", False)), "first_stage.checkpoint", section.checkpoint,
             "a stage-1 run directory (train one with configs/autoencoder.py), or random_init=True for tests")


def _check_diffusion(d: ml_collections.ConfigDict) -> None:
  try:
    canonical_prediction_type(d.prediction_type)
    make_beta_schedule(d.schedule, 2, d.linear_start, d.linear_end)
    check_timestep_sampling(d.get("timestep_sampling", "uniform"), d.get("timestep_scale", 1.0))
  except ValueError as e:
    raise ConfigError(f"config.diffusion: {e}") from None
  _require(d.loss_type in LOSS_TYPES, "diffusion.loss_type", d.loss_type, f"one of {LOSS_TYPES}")
  _require(d.weighting in WEIGHTINGS, "diffusion.weighting", d.weighting, f"one of {WEIGHTINGS}")
  _positive_int(d, "diffusion", "timesteps")
  _require(0.0 <= d.cond_dropout < 1.0, "diffusion.cond_dropout", d.cond_dropout, "a probability in [0, 1)")
