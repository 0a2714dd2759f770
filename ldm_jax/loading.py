"""``load_pipeline(path)``: a ready-to-sample ``LDMPipeline`` from a checkpoint.

Accepted: a stage-2 run directory written by ``train.py`` (its latest
checkpoint; EMA weights by default). Published formats (diffusers folders,
original Stable Diffusion / LDM files) and their conversions to our orbax
format are dispatched to ``ldm_jax.interop``.
"""

import os

import jax
import ml_collections
import numpy as np

from ldm_jax.training import checkpoint as ckpt_lib
from ldm_jax.training import ldm_step
from ldm_jax.training.first_stage_copy import load_first_stage_copy


def is_run_dir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "checkpoints"))


def load_pipeline(path: str, *, use_ema: bool = True, mesh=None, compute_dtype: str | None = None):
  """Loads a model for sampling from ``path`` (see module docstring)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path!r} does not exist")
  if is_run_dir(path):
    return _load_run_dir(path, use_ema=use_ema, mesh=mesh, compute_dtype=compute_dtype)
  if not use_ema and os.path.isdir(path):  # converted and diffusers folders keep one UNet
    raise ValueError(f"{path} holds one set of weights: use_ema=False (--no_ema) applies to training runs "
                     "and to original files with both the raw and the EMA UNet")
  from ldm_jax.interop import orbax_format

  if orbax_format.is_orbax_pipeline(path):
    return orbax_format.load(path, mesh=mesh, compute_dtype=compute_dtype)
  from ldm_jax.interop.pretrained import load_pretrained_pipeline  # published formats

  return load_pretrained_pipeline(path, mesh=mesh, compute_dtype=compute_dtype, use_ema=use_ema)


def _load_run_dir(path: str, *, use_ema: bool, mesh, compute_dtype: str | None):
  from ldm_jax.data.tokenizers import load_tokenizer
  from ldm_jax.pipeline import LDMPipeline
  from ldm_jax.training.train_ldm import build_model, example_inputs, schedule_from_config, step_config

  checkpointer = ckpt_lib.Checkpointer(os.path.join(path, "checkpoints"), async_save=False)
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
    tok_cfg = ml_collections.ConfigDict(dict(config.data.tokenizer.to_dict(), path=os.path.join(path, meta["tokenizer"])))
    tokenizer = load_tokenizer(tok_cfg)
  _, fs_variables, _, fs_config = load_first_stage_copy(os.path.join(path, "first_stage"))
  model = build_model(config, fs_config, meta["scale_factor"], tokenizer)
  frozen = {"first_stage": fs_variables}
  max_length = config.data.tokenizer.max_length
  if model.cond_key is not None and not model.cond_stage.trainable:
    frozen["cond"] = model.cond_stage.init(jax.random.key(0), np.zeros((1, max_length), np.int32))

  # Only the weights sampling uses are read (not the other set nor Adam's two moments: three
  # quarters of the state), onto one local device whatever devices saved them (the demo trains on two
  # CPU devices, sample.py may run on one); the pipeline then places them on its own mesh.
  example = example_inputs(model, config)
  side = config.data.image_size // model.downsample_factor
  cond_shapes = ldm_step.conditioning_shapes(model, example, frozen)
  abstract = jax.eval_shape(
      lambda rng: ldm_step.init_params(model, rng, example, cond_shapes, (1, side, side, model.latent_channels)),
      jax.random.key(0),
  )
  key = "ema_params" if use_ema and step_config(config).ema_decay > 0 else "params"
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  params = ckpt_lib.restore_subtree(checkpointer.directory, step, (key,), abstract, device, what=f"the LDM's {key}")
  checkpointer.close()
  return LDMPipeline(
      model, params, frozen, schedule_from_config(config.diffusion), tokenizer, max_length,
      config.diffusion.prediction_type, config.data.image_size, mesh,
  )
