"""Sampling algorithms, each a ``Sampler`` that the driver scans over; looked up by name."""

from ldm_jax.diffusion.samplers.base import Denoised, Sampler, StepTable
from ldm_jax.diffusion.samplers.ddim import DDIMSampler
from ldm_jax.diffusion.samplers.ddpm import DDPM_VARIANCES, DDPMSampler
from ldm_jax.diffusion.samplers.dpm_solver import DPMSolverPP2MSampler
from ldm_jax.diffusion.samplers.euler import EulerAncestralSampler, EulerSampler
from ldm_jax.diffusion.samplers.plms import PLMSSampler

# "plms" (LDM) and "pndm" (diffusers, skip_prk_steps=True) are the same algorithm.
SAMPLERS: dict[str, type[Sampler]] = {
    "ddpm": DDPMSampler,
    "ddim": DDIMSampler,
    "plms": PLMSSampler,
    "pndm": PLMSSampler,
    "dpmpp_2m": DPMSolverPP2MSampler,
    "euler": EulerSampler,
    "euler_ancestral": EulerAncestralSampler,
}

__all__ = ["DDPM_VARIANCES", "SAMPLERS", "Denoised", "Sampler", "StepTable"]
