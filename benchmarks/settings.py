"""What one benchmark run measures: the model family, shapes, precision and sampler length."""

import dataclasses

from benchmarks.configs import ModelConfig, get_config

# In the order they run: unet_train donates (consumes) the UNet parameters, so it comes last.
WORKLOADS = ("unet_fwd", "vae_encode", "vae_decode", "sampler", "sampler_step", "unet_train")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Settings:
  """Shapes and policies shared by our side and the PyTorch baseline.

  ``dtype`` is the compute dtype; parameters and optimiser state stay float32
  (torch: autocast with float32 parameters).
  """

  config: str = "tiny"
  batch: int = 4
  image_size: int = 64
  dtype: str = "float32"
  steps: int = 10  # sampler steps
  guidance_scale: float = 7.5
  attention_impl: str = "auto"
  remat_policy: str = "none"
  seed: int = 0

  def __post_init__(self):
    get_config(self.config)  # validates the name
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
    if self.batch < 1 or self.steps < 1:
      raise ValueError(f"batch and steps must be positive, got {self.batch}, {self.steps}")
    factor = self.model.downsample_factor * 2 ** (len(self.model.unet["block_out_channels"]) - 1)
    if self.image_size % factor:
      raise ValueError(f"image_size must be a multiple of {factor} for config {self.config!r}, got {self.image_size}")

  @property
  def model(self) -> ModelConfig:
    return get_config(self.config)

  @property
  def latent_size(self) -> int:
    return self.image_size // self.model.downsample_factor
