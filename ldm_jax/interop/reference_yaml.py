"""A text-to-image ``LDMPipeline`` as the reference implementation's YAML config.

Original Stable Diffusion 2.x files come with one (``v2-inference.yaml``,
``v2-inference-v.yaml``): the weights do not say whether the UNet predicts
eps or v. :func:`reference_config` writes the same layout, which the
original scripts and ``load_pretrained_pipeline`` (``<file stem>.yaml``) read.
"""

from typing import Any

import numpy as np

from ldm_jax.diffusion.schedules import make_beta_schedule

# UNetModel fields that the reference's openaimodel.UNetModel takes under the same name.
_REFERENCE_UNET_KEYS = (
    "image_size", "in_channels", "out_channels", "model_channels", "attention_resolutions", "num_res_blocks",
    "channel_mult", "dropout", "conv_resample", "num_classes", "num_heads", "num_head_channels",
    "num_heads_upsample", "use_scale_shift_norm", "resblock_updown", "use_new_attention_order",
    "use_spatial_transformer", "transformer_depth", "context_dim", "use_linear_in_transformer", "legacy",
)
_REFERENCE_GROUPS = 32  # the reference's GroupNorm; other counts are written for our loader only


def _plain(value: Any) -> Any:
  """YAML-friendly: tuples as lists, NumPy scalars as Python numbers."""
  if isinstance(value, (tuple, list)):
    return [_plain(v) for v in value]
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  return value.item() if isinstance(value, np.generic) else value


def linear_schedule_ends(betas: np.ndarray) -> tuple[float, float]:
  """``(linear_start, linear_end)`` of the LDM ``linear`` schedule these betas are; ValueError otherwise."""
  betas = np.asarray(betas, np.float64)
  # Shortest decimals of the float32 ends: 0.00085, not 0.0008500000112690032.
  start, end = float(str(np.float32(betas[0]))), float(str(np.float32(betas[-1])))
  if not np.allclose(make_beta_schedule("linear", betas.size, start, end), betas, rtol=1e-6, atol=0):
    raise ValueError("the model's noise schedule is not the LDM 'linear' schedule Stable Diffusion files assume")
  return start, end


def reference_config(pipeline, *, clip_params: dict[str, Any] | None = None) -> dict[str, Any]:
  """The reference ``LatentDiffusion`` config of a KL-autoencoder, OpenCLIP-conditioned (SD 2.x) ``pipeline``.

  SD inpainting models (``concat_kind == "inpaint"``: z_t, mask, masked
  latent) become the reference's ``LatentInpaintDiffusion`` with ``hybrid``
  conditioning.
  """
  model = pipeline.model
  if model.concat_kind not in ("none", "inpaint") or model.inpaint_latent_first:
    raise ValueError(f"Stable Diffusion files hold text-to-image or SD-inpainting models, not concat kind "
                     f"{model.concat_kind!r}" + (" in the paper's [z_t, masked latent, mask] order"
                                                 if model.inpaint_latent_first else ""))
  inpaint = model.concat_kind == "inpaint"
  fs = model.first_stage
  factor = 2 ** (len(fs.ddconfig["ch_mult"]) - 1)
  unet = {k: getattr(model.unet, k) for k in _REFERENCE_UNET_KEYS}
  unet["image_size"] = pipeline.image_size // factor
  if model.unet.norm_num_groups != _REFERENCE_GROUPS:
    unet["norm_num_groups"] = model.unet.norm_num_groups
  start, end = linear_schedule_ends(np.asarray(pipeline.schedule.betas))
  params = dict(
      parameterization=pipeline.prediction_type, linear_start=start, linear_end=end,
      timesteps=int(np.shape(pipeline.schedule.betas)[0]), num_timesteps_cond=1, log_every_t=200,
      first_stage_key="jpg", cond_stage_key="txt", image_size=pipeline.image_size // factor,
      channels=fs.embed_dim, cond_stage_trainable=False, conditioning_key="hybrid" if inpaint else "crossattn",
      monitor="val/loss_simple_ema",
      scale_factor=float(model.scale_factor), use_ema=False,
      unet_config={"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
      first_stage_config={"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
          "embed_dim": fs.embed_dim, "monitor": "val/rec_loss", "ddconfig": dict(fs.ddconfig),
          "lossconfig": {"target": "torch.nn.Identity"}}},
      cond_stage_config={"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                         "params": dict(clip_params or {})},
  )
  target = "ldm.models.diffusion.ddpm." + ("LatentInpaintDiffusion" if inpaint else "LatentDiffusion")
  return _plain({"model": {"base_learning_rate": 1.0e-4, "target": target, "params": params}})


def write_reference_yaml(pipeline, path: str, **kwargs: Any) -> None:
  """Writes :func:`reference_config` of ``pipeline`` to ``path``."""
  import yaml  # PyYAML comes with ml_collections

  with open(path, "w") as f:
    yaml.safe_dump(reference_config(pipeline, **kwargs), f, sort_keys=False)
