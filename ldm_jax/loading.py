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
from ldm_jax.training.optim import make_optimizer


def is_run_dir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "checkpoints"))


def load_pipeline(path: str, *, use_ema: bool = True, mesh=None, compute_dtype: str | None = None):
  """Loads a model for sampling from ``path`` (see module docstring)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path!r} does not exist")
  if is_run_dir(path):
    return _load_run_dir(path, use_ema=use_ema, mesh=mesh, compute_dtype=compute_dtype)
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

  # Rebuild the train state's structure (abstractly) so orbax can restore it.
  tx, _ = make_optimizer(config.optim, config.train.num_steps, config.train.batch_size)
  example = example_inputs(model, config)
  side = config.data.image_size // model.downsample_factor
  init = ldm_step.make_init_fn(model, tx, step_config(config), example, frozen,
                               (1, side, side, model.latent_channels))
  abstract = jax.eval_shape(init, jax.random.key(0))
  # Onto one local device, whatever devices saved it (the demo trains on two CPU devices, sample.py
  # may run on one); the pipeline then places the weights on its own mesh.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = ckpt_lib.abstract_with_shardings(abstract, jax.tree.map(lambda _: device, abstract))
  state, _ = checkpointer.restore(step, abstract)
  checkpointer.close()
  params = state.ema_params if (use_ema and state.ema_params is not None) else state.params
  return LDMPipeline(
      model, params, frozen, schedule_from_config(config.diffusion), tokenizer, max_length,
      config.diffusion.prediction_type, config.data.image_size, mesh,
  )
