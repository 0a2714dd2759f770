"""The benchmarked architectures, written once as diffusers configs.

The PyTorch baseline builds ``UNet2DConditionModel(**unet)`` / ``AutoencoderKL(**vae)``
from these dicts; our side derives its module fields from the same dicts
(``unet_fields_from_diffusers_config`` and :func:`vae_ddconfig`), so both
sides always run the same architecture.
"""

import dataclasses
from typing import Any

from ldm_jax.interop.diffusers_unet import unet_fields_from_diffusers_config

SD_LATENT_SCALE = 0.18215
CONTEXT_LENGTH = 77  # CLIP's token count

_CROSS_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
_CROSS_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
_SD_UNET = dict(
    in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=_CROSS_DOWN, up_block_types=_CROSS_UP, norm_num_groups=32,
)
_SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
    layers_per_block=2, norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """One benchmarked model family: diffusers configs of its UNet and VAE."""

  unet: dict[str, Any]
  vae: dict[str, Any]

  @property
  def context_dim(self) -> int:
    return self.unet["cross_attention_dim"]

  @property
  def latent_channels(self) -> int:
    return self.vae["latent_channels"]

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.vae["block_out_channels"]) - 1)


CONFIGS: dict[str, ModelConfig] = {
    # SD v1.5: 8 heads everywhere (diffusers' attention_head_dim is the head count), 1x1-conv proj.
    "sd15": ModelConfig(dict(_SD_UNET, cross_attention_dim=768, attention_head_dim=8), _SD_VAE),
    # SD v2.x: 64-channel heads, linear proj_in/proj_out, 1024-d OpenCLIP context.
    "sd2": ModelConfig(
        dict(_SD_UNET, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
        _SD_VAE,
    ),
    # SD v1's layout at small widths, so that every workload runs on a CPU in seconds.
    "tiny": ModelConfig(
        dict(
            _SD_UNET, block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=8,
            cross_attention_dim=64, attention_head_dim=4,
        ),
        dict(_SD_VAE, block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8),
    ),
    # Two levels at tiny widths: what `benchmarks.device_check --dry_run` runs, seconds to compile on a CPU.
    "micro": ModelConfig(
        dict(
            _SD_UNET, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, cross_attention_dim=16,
            attention_head_dim=2, down_block_types=_CROSS_DOWN[2:], up_block_types=_CROSS_UP[:2],
        ),
        dict(_SD_VAE, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
             down_block_types=_SD_VAE["down_block_types"][:2], up_block_types=_SD_VAE["up_block_types"][:2]),
    ),
}


def get_config(name: str) -> ModelConfig:
  if name not in CONFIGS:
    raise ValueError(f"unknown benchmark config {name!r}; available: {sorted(CONFIGS)}")
  return CONFIGS[name]


def unet_fields(config: ModelConfig, **overrides: Any) -> dict[str, Any]:
  """Our ``UNetModel`` fields for ``config`` (e.g. ``dtype``, ``attention_impl`` as overrides)."""
  return {**unet_fields_from_diffusers_config(config.unet), **overrides}


def vae_ddconfig(config: ModelConfig) -> dict[str, Any]:
  """Our ``AutoencoderKL`` ``ddconfig`` for ``config.vae`` (diffusers' VAE has no attention outside mid)."""
  vae = config.vae
  ch = vae["block_out_channels"][0]
  return dict(
      ch=ch, ch_mult=tuple(c // ch for c in vae["block_out_channels"]), num_res_blocks=vae["layers_per_block"],
      attn_resolutions=(), z_channels=vae["latent_channels"], double_z=True, in_channels=vae["in_channels"],
      out_ch=vae["out_channels"], norm_num_groups=vae["norm_num_groups"],
  )
