"""Reading our own run directories: a stage-1 run's autoencoder and a
stage-2 run's model, tokenizer and first-stage copy.

Only the weights that are asked for are read (never the optimiser or
discriminator state, nor the other of raw/EMA weights), onto one local
device whatever devices saved them.
"""

import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from ldm_jax.assembly import build_model, example_inputs, schedule_from_config, step_config
from ldm_jax.data.tokenizers import load_tokenizer
from ldm_jax.interop.cond_stage import cond_stage_variables
from ldm_jax.interop.pretrained import load_pretrained_pipeline
from ldm_jax.models.autoencoder import AutoencoderKL
from ldm_jax.models.first_stage import make_first_stage
from ldm_jax.models.latent_diffusion import LatentDiffusion
from ldm_jax.models.unet import UNetModel
from ldm_jax.models.vq import VQModel
from ldm_jax.nn.lora import LoRAConfig
from ldm_jax.pipeline import LDMPipeline
from ldm_jax.training import ldm_step
from ldm_jax.training.checkpoint import Checkpointer, restore_subtree
from ldm_jax.training.first_stage_copy import load_first_stage_copy
from ldm_jax.training.first_stage_io import AE_PARAMS_PATH, STAGE
from ldm_jax.training.lora import lora_config, model_params


def is_run_dir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "checkpoints"))


def load_first_stage_run(
    path: str | os.PathLike,
    *,
    model_config: Mapping[str, Any] | None = None,
    step: int | None = None,
    sharding: jax.sharding.Sharding | None = None,
) -> tuple[AutoencoderKL | VQModel, dict, float, dict]:
  """``(model, variables, scale_factor, model_config)`` of a trained first stage.

  Args:
    path: a stage-1 run directory (or its ``checkpoints`` folder).
    model_config: ``{kind, embed_dim, n_embed, ddconfig}`` to build instead
      of the stored one (e.g. a stage-2 config's ``first_stage``); arrays
      that do not fit it are named in one :class:`CheckpointMismatchError`.
    step: the checkpoint to read (default: the latest).
    sharding: where to place the weights (default: the first local device).
  """
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if os.path.isfile(path):
    raise ValueError(f"{path} is a file, not a stage-1 run directory: published first stages load through "
                     "ldm_jax.interop.load.load_first_stage")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no stage-1 run directory at {path!r}")
  return _load_run(path, model_config, step, sharding)


def _checkpoint_dir(run_dir: str) -> str:
  nested = os.path.join(run_dir, "checkpoints")
  return nested if os.path.isdir(nested) else run_dir


def _load_run(run_dir, model_config, step, sharding):
  ckpt_dir = _checkpoint_dir(run_dir)
  manager = ocp.CheckpointManager(
      ckpt_dir,
      options=ocp.CheckpointManagerOptions(create=False),
      item_handlers={"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
  )
  try:
    steps = manager.all_steps()
    if not steps:
      raise FileNotFoundError(
          f"no checkpoint in {ckpt_dir!r}: not a stage-1 run directory (expected {run_dir}/checkpoints/<step>)"
      )
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise FileNotFoundError(f"no checkpoint {step} in {ckpt_dir!r}; available steps: {sorted(steps)}")
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"] or {}
    if meta.get("stage") != STAGE:
      raise ValueError(
          f"checkpoint {step} in {ckpt_dir!r} is not a first stage (its metadata says stage "
          f"{meta.get('stage')!r}, expected {STAGE!r})"
      )
    model_config = dict(model_config if model_config is not None else meta["model"])
    model = make_first_stage(model_config)
  finally:
    manager.close()
  sharding = sharding or jax.sharding.make_single_device_sharding(jax.local_devices()[0])
  params = restore_subtree(ckpt_dir, step, AE_PARAMS_PATH, _abstract_params(model), sharding, what="the first stage")
  return model, {"params": params}, float(meta["scale_factor"]), model_config


def _abstract_params(model: AutoencoderKL | VQModel) -> Any:
  """Parameter shapes of ``model`` (nothing is allocated)."""
  size = model.downsample_factor
  x = jax.ShapeDtypeStruct((1, size, size, model.ddconfig.get("in_channels", 3)), jax.numpy.float32)
  kw = {"sample_posterior": False} if isinstance(model, AutoencoderKL) else {}
  return jax.eval_shape(lambda rng, x: model.init(rng, x, **kw), jax.random.key(0), x)["params"]


def frozen_cond_variables(model: LatentDiffusion, config: ml_collections.ConfigDict) -> Any:
  """The frozen conditioning encoder's variables (from its ``checkpoint`` when
  it names one); None when the encoder is trained with the UNet or absent."""
  if model.cond_key is None or model.cond_stage.trainable:
    return None
  tokens = np.zeros((1, config.data.tokenizer.max_length), np.int32)
  return cond_stage_variables(model.cond_stage, jax.random.key(0), tokens)


def pretrained_unet(source: str, *, use_ema: bool = True, prediction_type: str | None = None) -> Any:
  """The UNet variables of a run directory or a published checkpoint (host arrays)."""
  if not os.path.exists(source):
    raise FileNotFoundError(f"the pretrained UNet {source!r} does not exist")
  if is_run_dir(source):
    pipeline = load_ldm_run(source, use_ema=use_ema)
  else:
    pipeline = load_pretrained_pipeline(source, use_ema=use_ema, prediction_type=prediction_type)
  return jax.device_get(pipeline.params["unet"])


def load_ldm_run(path: str, *, use_ema: bool = True, mesh=None, compute_dtype: str | None = None) -> LDMPipeline:
  """The pipeline of a stage-2 run directory's latest checkpoint (EMA weights by default).

  A LoRA run's adapters are merged into the UNet they adapt (``pretrained.unet_from``).
  """
  run = _read_ldm_run(path, use_ema=use_ema, compute_dtype=compute_dtype)
  frozen = dict(run.frozen)
  params = model_params(run.trained, frozen, run.lora)
  frozen.pop("unet", None)
  config = run.config
  return LDMPipeline(
      run.model, params, frozen, schedule_from_config(config.diffusion), run.tokenizer,
      config.data.tokenizer.max_length, config.diffusion.prediction_type, config.data.image_size, mesh,
  )


def load_run_adapters(path: str, *, use_ema: bool = True) -> tuple[LoRAConfig, dict, UNetModel]:
  """``(lora_config, adapters, unet)`` of a LoRA run directory's latest checkpoint (for export)."""
  run = _read_ldm_run(path, use_ema=use_ema, compute_dtype=None)
  if run.lora is None:
    raise ValueError(f"{path} is a full fine-tuning run (lora.rank 0): it has no adapters to export")
  return run.lora, jax.device_get(run.trained["lora"]), run.model.unet


class _LDMRun(NamedTuple):
  config: ml_collections.ConfigDict
  model: LatentDiffusion
  tokenizer: Any
  frozen: dict
  trained: Any  # the state's params (or EMA): the UNet, or a LoRA run's adapters
  lora: LoRAConfig | None


def _read_ldm_run(path: str, *, use_ema: bool, compute_dtype: str | None) -> _LDMRun:
  checkpointer = Checkpointer(os.path.join(path, "checkpoints"), async_save=False)
  step = checkpointer.latest_step()
  if step is None:
    raise FileNotFoundError(f"{path} is a run directory without checkpoints yet")
  meta = checkpointer.read_meta(step)
  if not meta or "first_stage" not in meta:
    raise ValueError(f"{path} holds a stage-1 (autoencoder) run, not a latent diffusion model")
  config = ml_collections.ConfigDict(meta["config"])
  if compute_dtype:
    config.precision.compute_dtype = compute_dtype
  tokenizer = None
  if meta.get("tokenizer"):
    tok_path = os.path.join(path, meta["tokenizer"])
    tok_cfg = ml_collections.ConfigDict(dict(config.data.tokenizer.to_dict(), path=tok_path))
    tokenizer = load_tokenizer(tok_cfg)
  _, fs_variables, _, fs_config = load_first_stage_copy(os.path.join(path, "first_stage"))
  model = build_model(config, fs_config, meta["scale_factor"], tokenizer)
  frozen = {"first_stage": fs_variables}
  cond = frozen_cond_variables(model, config)
  if cond is not None:
    frozen["cond"] = cond

  # Only the weights sampling uses are read (not the other set nor Adam's two moments: three
  # quarters of the state), onto one local device whatever devices saved them (the demo trains on two
  # CPU devices, sample.py may run on one); the pipeline then places them on its own mesh.
  example = example_inputs(model, config)
  side = config.data.image_size // model.downsample_factor
  lora = lora_config(config)
  if lora is not None:  # a LoRA run saved adapters: the UNet they adapt is the one it started from
    frozen["unet"] = pretrained_unet(config.pretrained.unet_from, use_ema=config.pretrained.weights == "ema",
                                     prediction_type=config.pretrained.prediction_type or None)
  init_fn = ldm_step.make_init_fn(model, optax.identity(), step_config(config), example, frozen,
                                  (1, side, side, model.latent_channels), lora)
  abstract = jax.eval_shape(init_fn, jax.random.key(0)).params
  key = "ema_params" if use_ema and step_config(config).ema_decay > 0 else "params"
  device = jax.sharding.make_single_device_sharding(jax.local_devices()[0])
  trained = restore_subtree(checkpointer.directory, step, (key,), abstract, device, what=f"the LDM's {key}")
  checkpointer.close()
  return _LDMRun(config, model, tokenizer, frozen, trained, lora)
