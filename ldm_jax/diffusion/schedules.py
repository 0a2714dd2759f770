"""Beta schedules and the precomputed diffusion tables (LDM ``register_schedule``).

Names follow the LDM code base, where ``"linear"`` is *linear in sqrt(beta)*
(diffusers' ``scaled_linear``) and ``"sqrt_linear"`` is linear in beta
(diffusers' ``linear``). The diffusers names ``scaled_linear`` and
``squaredcos_cap_v2`` are accepted as aliases; diffusers' ``linear`` is not,
because it would silently mean the other schedule
(use :func:`schedule_name_from_diffusers`).

Tables are computed in float64 and stored as float32 arrays; everything that
reads them stays float32 whatever dtype the network runs in.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

BETA_SCHEDULES = ("linear", "sqrt_linear", "cosine", "sqrt")
_ALIASES = {"scaled_linear": "linear", "squaredcos_cap_v2": "cosine"}
_FROM_DIFFUSERS = {"scaled_linear": "linear", "linear": "sqrt_linear", "squaredcos_cap_v2": "cosine"}


def schedule_name_from_diffusers(beta_schedule: str) -> str:
  """Maps a diffusers ``beta_schedule`` name to the LDM name used here."""
  if beta_schedule not in _FROM_DIFFUSERS:
    raise ValueError(
        f"unknown diffusers beta_schedule {beta_schedule!r}; expected one of {sorted(_FROM_DIFFUSERS)}"
    )
  return _FROM_DIFFUSERS[beta_schedule]


def make_beta_schedule(
    name: str,
    num_timesteps: int = 1000,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> np.ndarray:
  """Betas of the named LDM schedule, float64, shape ``(num_timesteps,)``."""
  if num_timesteps <= 0:
    raise ValueError(f"num_timesteps must be positive, got {num_timesteps}")
  canonical = _ALIASES.get(name, name)
  if canonical == "linear":
    return np.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=np.float64) ** 2
  if canonical == "sqrt_linear":
    return np.linspace(linear_start, linear_end, num_timesteps, dtype=np.float64)
  if canonical == "sqrt":
    return np.linspace(linear_start, linear_end, num_timesteps, dtype=np.float64) ** 0.5
  if canonical == "cosine":
    # Nichol & Dhariwal: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2).
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps + cosine_s
    alpha_bar = np.cos(steps / (1 + cosine_s) * math.pi / 2) ** 2
    return np.clip(1 - alpha_bar[1:] / alpha_bar[:-1], 0.0, 0.999)
  valid = list(BETA_SCHEDULES) + sorted(_ALIASES)
  raise ValueError(f"unknown beta schedule {name!r}; valid names are {valid}")


def interpolate_sigma(sigmas: jax.Array, t: jax.Array) -> jax.Array:
  """``sigmas`` (one per integer timestep) linearly interpolated at float timesteps ``t``."""
  grid = jnp.arange(sigmas.shape[0], dtype=jnp.float32)
  return jnp.interp(jnp.asarray(t, jnp.float32), grid, sigmas)


@struct.dataclass
class DiffusionSchedule:
  """Per-timestep float32 tables of a discrete diffusion, indexed by ``t`` in [0, T)."""

  betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod: jax.Array
  sqrt_recipm1_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]

  @property
  def sigmas(self) -> jax.Array:
    """Noise-to-signal ratios sqrt((1 - a_bar) / a_bar) (the sigma of sigma-space samplers)."""
    return jnp.sqrt((1.0 - self.alphas_cumprod) / self.alphas_cumprod)

  def sigma_at(self, t: jax.Array) -> jax.Array:
    """Sigma at (possibly fractional) timesteps, linearly interpolated as diffusers does."""
    return interpolate_sigma(self.sigmas, t)

  @classmethod
  def from_betas(cls, betas: np.ndarray) -> "DiffusionSchedule":
    """Builds the tables in float64 from ``betas`` and stores them as float32."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size == 0:
      raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    if not np.all((betas > 0) & (betas < 1)):
      raise ValueError("betas must lie strictly between 0 and 1")
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    tables = dict(
        betas=betas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
        posterior_variance=posterior_variance,
        # The posterior variance is 0 at t = 0; clip before the log as the reference does.
        posterior_log_variance_clipped=np.log(np.maximum(posterior_variance, 1e-20)),
        posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    )
    return cls(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in tables.items()})


def make_schedule(
    name: str = "linear",
    num_timesteps: int = 1000,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> DiffusionSchedule:
  """``DiffusionSchedule`` of a named beta schedule (SD: ``"linear", 1000, 0.00085, 0.012``)."""
  return DiffusionSchedule.from_betas(
      make_beta_schedule(name, num_timesteps, linear_start, linear_end, cosine_s)
  )
