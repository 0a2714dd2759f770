"""``train.py``: train a first stage or a latent diffusion model.

The trainers in ``ldm_jax.training`` never open weight files; this module
reads what a config names through ``ldm_jax.interop`` (LPIPS for stage 1;
the first stage, a frozen text encoder and the FID network for stage 2) and
hands it over.
"""

import os

import jax
import ml_collections

from ldm_jax.assembly import build_model
from ldm_jax.interop.feature_nets import make_feature_net
from ldm_jax.interop.finetune import start_from_pretrained, unet_init_params
from ldm_jax.interop.load import first_stage_for, frozen_cond_variables
from ldm_jax.interop.lpips import load_lpips_params
from ldm_jax.training import train_autoencoder, train_ldm
from ldm_jax.training.checkpoint import saved_steps
from ldm_jax.training.config_check import check_training_config
from ldm_jax.training.lora import lora_config

STAGES = ("autoencoder", "ldm")


def train(config: ml_collections.ConfigDict, workdir: str):
  """Trains (or resumes) the stage ``config.stage`` names in ``workdir``."""
  if config.stage == "autoencoder":
    return train_first_stage(config, workdir)
  if config.stage == "ldm":
    return train_latent_diffusion(config, workdir)
  raise ValueError(f"config.stage must be one of {STAGES}, got {config.stage!r}")


def check(config: ml_collections.ConfigDict) -> None:
  """Fails with one line naming the key when a setting cannot work (``ConfigError``)."""
  check_training_config(config, jax.device_count(), jax.process_count())


def train_first_stage(config: ml_collections.ConfigDict, workdir: str) -> train_autoencoder.AutoencoderTrainResult:
  check(config)
  lpips = None
  if train_autoencoder.needs_lpips(config.loss):  # a missing file fails here, before anything compiles
    lpips = load_lpips_params(config.loss.lpips_weights or None)
  return train_autoencoder.train(config, workdir, lpips_params=lpips)


def train_latent_diffusion(config: ml_collections.ConfigDict, workdir: str) -> train_ldm.TrainResult:
  check(config)
  # A resumed run restores its UNet from its own checkpoint (or fails loudly): the starting weights
  # are not read again, except a LoRA run's frozen base UNet, which its checkpoints do not hold.
  need_unet = not saved_steps(os.path.join(workdir, "checkpoints")) or lora_config(config) is not None
  unet_params = None
  if config.get("pretrained") is not None and config.pretrained.path:
    # One read of the published model: the completed config and the weights.
    start = start_from_pretrained(config, with_unet=need_unet)
    config, first_stage, cond_variables = start.config, start.first_stage, start.cond_variables
    model = build_model(config, first_stage.model_config, first_stage.scale_factor)
    unet_params = start.unet_params
  else:
    first_stage = first_stage_for(config)
    model = build_model(config, first_stage.model_config, first_stage.scale_factor)
    cond_variables = frozen_cond_variables(model, config)
  if need_unet and unet_params is None:
    unet_params = unet_init_params(config, model)
  feature_net = None
  if config.get("eval") is not None and config.eval.every > 0:
    e = config.eval
    feature_net = make_feature_net(e.feature_net, inception_weights=e.inception_weights,
                                   judge_weights=e.judge_weights, flag_prefix="config.eval.")
  return train_ldm.train(config, workdir, first_stage=first_stage, cond_variables=cond_variables,
                         unet_params=unet_params, feature_net=feature_net)
