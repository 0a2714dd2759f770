"""Input checks of ``sample``: each failure says what was wrong and what is allowed.

They run on shapes and Python values only, so they work on traced arrays too.
"""

import numbers
from typing import Any

import jax.numpy as jnp

from ldm_jax.diffusion.config import SamplerConfig
from ldm_jax.diffusion.guidance import check_uncond_matches
from ldm_jax.diffusion.schedules import DiffusionSchedule


def _check_mask(mask: Any, shape: tuple[int, ...]) -> None:
  mask_shape = jnp.shape(mask)
  try:
    broadcast = jnp.broadcast_shapes(mask_shape, shape)
  except ValueError:
    broadcast = None
  if len(mask_shape) != len(shape) or broadcast != shape:
    raise ValueError(
        f"mask shape {mask_shape} does not match x_T shape {shape}: it must have the same number of "
        "axes and broadcast to it (e.g. (B, H, W, 1) for NHWC latents)"
    )


def check_sample_inputs(
    config: Any,
    x_T: Any,
    schedule: Any,
    cond: Any,
    uncond: Any,
    guidance_scale: Any,
    eta: Any,
    init_latent: Any,
    strength: Any,
    mask: Any,
) -> None:
  """Raises ``ValueError`` / ``TypeError`` for inputs ``sample`` cannot honour."""
  if not isinstance(config, SamplerConfig):
    raise TypeError(f"config must be a SamplerConfig, got {type(config).__name__}")
  if not isinstance(schedule, DiffusionSchedule):
    raise TypeError(f"schedule must be a DiffusionSchedule, got {type(schedule).__name__}")
  shape = jnp.shape(x_T)
  if len(shape) < 1 or shape[0] == 0:
    raise ValueError(f"x_T must have a non-empty leading batch axis, got shape {shape}")
  if uncond is not None:
    if cond is None:
      raise ValueError("uncond was given without cond: classifier-free guidance needs both")
    check_uncond_matches(cond, uncond)
  if jnp.ndim(guidance_scale) != 0:
    raise ValueError(f"guidance_scale must be a scalar, got shape {jnp.shape(guidance_scale)}")
  if isinstance(eta, numbers.Number):
    if eta < 0:
      raise ValueError(f"eta must be >= 0, got {eta}")
    if eta != 0 and not config.make_sampler().supports_eta:
      raise ValueError(f"eta applies to the 'ddim' sampler only; sampler {config.sampler!r} needs eta=0")
  if strength is not None:
    if not isinstance(strength, numbers.Real) or not 0.0 <= strength <= 1.0:
      raise ValueError(f"strength must be a number in [0, 1] (or None for pure noise), got {strength!r}")
  if (strength is not None or mask is not None) and init_latent is None:
    raise ValueError("strength and mask need init_latent (the latent to start from or to keep)")
  if init_latent is not None and strength is None and mask is None:
    raise ValueError("init_latent needs strength (img2img) or mask (inpainting); for text-to-image leave it None")
  if init_latent is not None and jnp.shape(init_latent) != shape:
    raise ValueError(f"init_latent shape {jnp.shape(init_latent)} differs from x_T shape {shape}")
  if mask is not None:
    _check_mask(mask, shape)
