"""The PyTorch reference side: diffusers' UNet2DConditionModel / AutoencoderKL / DDIMScheduler.

The modules are built from the same diffusers configs our side derives its
fields from (random weights), fed random inputs of the same shapes (NCHW),
with the same dtype policy: float32 parameters, ``torch.autocast`` to
bfloat16 when ``settings.dtype == "bfloat16"``. Inference runs under
``torch.inference_mode``. Needs the ``parity`` extra (torch, diffusers).
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel

from benchmarks.configs import CONTEXT_LENGTH, SD_LATENT_SCALE
from benchmarks.settings import Settings

# Stable Diffusion's scheduler config (scheduler/scheduler_config.json of SD 1.5 / 2.1).
SD_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
)


@dataclasses.dataclass
class TorchWorkload:
  """``step()`` runs one synchronised call."""

  name: str
  step: Callable[[], None]
  images: int


class TorchModels:
  """diffusers modules for ``settings`` on ``device`` and random inputs."""

  def __init__(self, settings: Settings, device: str):
    self.s, self.device = settings, torch.device(device)
    torch.manual_seed(settings.seed)
    self.unet = UNet2DConditionModel(**settings.model.unet).to(self.device)
    self.vae = AutoencoderKL(**settings.model.vae).to(self.device).eval()

  def autocast(self):
    return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.s.dtype == "bfloat16")

  def sync(self) -> None:
    if self.device.type == "cuda":
      torch.cuda.synchronize(self.device)

  def normal(self, *shape: int) -> torch.Tensor:
    return torch.randn(shape, device=self.device)

  def latents(self, batch: int) -> torch.Tensor:
    return self.normal(batch, self.s.model.latent_channels, self.s.latent_size, self.s.latent_size)

  def context(self, batch: int) -> torch.Tensor:
    return self.normal(batch, CONTEXT_LENGTH, self.s.model.context_dim)

  def timesteps(self, batch: int) -> torch.Tensor:
    return torch.randint(0, SD_SCHEDULER["num_train_timesteps"], (batch,), device=self.device)

  def inference(self, fn: Callable[[], Any]) -> Callable[[], None]:
    """``fn`` under inference mode and autocast, synchronised."""

    def step() -> None:
      with torch.inference_mode(), self.autocast():
        fn()
      self.sync()

    return step


def unet_fwd(m: TorchModels) -> TorchWorkload:
  b = m.s.batch
  x, t, ctx = m.latents(b), m.timesteps(b), m.context(b)
  m.unet.eval()
  return TorchWorkload("unet_fwd", m.inference(lambda: m.unet(x, t, encoder_hidden_states=ctx).sample), b)


def unet_train(m: TorchModels) -> TorchWorkload:
  """eps-prediction MSE, backward and AdamW (lr 1e-4, weight decay 0.01; fused kernel)."""
  b = m.s.batch
  z0, ctx = m.latents(b), m.context(b)
  noise_schedule = DDPMScheduler(**{k: v for k, v in SD_SCHEDULER.items() if k != "set_alpha_to_one"})
  m.unet.train()
  opt = torch.optim.AdamW(m.unet.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                          fused=True)

  def step() -> None:
    t, noise = m.timesteps(b), torch.randn_like(z0)
    x_t = noise_schedule.add_noise(z0, noise, t)
    with m.autocast():
      out = m.unet(x_t, t, encoder_hidden_states=ctx).sample
    F.mse_loss(out.float(), noise).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    m.sync()

  return TorchWorkload("unet_train", step, b)


def vae_encode(m: TorchModels) -> TorchWorkload:
  b = m.s.batch
  x = m.normal(b, 3, m.s.image_size, m.s.image_size)
  return TorchWorkload("vae_encode", m.inference(lambda: m.vae.encode(x).latent_dist.mode()), b)


def vae_decode(m: TorchModels) -> TorchWorkload:
  b = m.s.batch
  z = m.latents(b)
  return TorchWorkload("vae_decode", m.inference(lambda: m.vae.decode(z).sample), b)


def guided_ddim_step(m: TorchModels, scheduler: DDIMScheduler, latents, t, ctx2) -> torch.Tensor:
  """One DDIM step with classifier-free guidance: the UNet on ``[uncond; cond]``, float32 latents."""
  x2 = scheduler.scale_model_input(torch.cat([latents, latents]), t)
  eps_u, eps_c = m.unet(x2, t, encoder_hidden_states=ctx2).sample.float().chunk(2)
  return scheduler.step(eps_u + m.s.guidance_scale * (eps_c - eps_u), t, latents).prev_sample


def _sampler_inputs(m: TorchModels) -> tuple[torch.Tensor, torch.Tensor, DDIMScheduler]:
  m.unet.eval()
  scheduler = DDIMScheduler(**SD_SCHEDULER)
  scheduler.set_timesteps(m.s.steps, device=m.device)
  return m.latents(m.s.batch), torch.cat([m.context(m.s.batch), m.context(m.s.batch)]), scheduler


def sampler(m: TorchModels) -> TorchWorkload:
  """``steps`` guided DDIM steps, then decode."""
  x_T, ctx2, scheduler = _sampler_inputs(m)

  def txt2img() -> torch.Tensor:
    scheduler.set_timesteps(m.s.steps, device=m.device)
    latents = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
      latents = guided_ddim_step(m, scheduler, latents, t, ctx2)
    return m.vae.decode(latents / SD_LATENT_SCALE).sample

  return TorchWorkload("sampler", m.inference(txt2img), m.s.batch)


def sampler_step(m: TorchModels) -> TorchWorkload:
  """The first of the sampler's guided DDIM steps."""
  x_T, ctx2, scheduler = _sampler_inputs(m)
  t = scheduler.timesteps[0]
  return TorchWorkload("sampler_step", m.inference(lambda: guided_ddim_step(m, scheduler, x_T, t, ctx2)), m.s.batch)


BUILDERS: dict[str, Callable[[TorchModels], TorchWorkload]] = {
    "unet_fwd": unet_fwd, "unet_train": unet_train, "vae_encode": vae_encode, "vae_decode": vae_decode,
    "sampler": sampler, "sampler_step": sampler_step,
}


def peak_memory_bytes(device: str) -> int | None:
  return torch.cuda.max_memory_allocated() if device.startswith("cuda") else None


def reset_peak_memory(device: str) -> None:
  if device.startswith("cuda"):
    torch.cuda.reset_peak_memory_stats()


def default_device() -> str:
  return "cuda" if torch.cuda.is_available() else "cpu"
