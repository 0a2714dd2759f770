"""The contract between a sampler and the driver, and the pieces samplers share.

A sampler turns a decreasing timestep grid into a ``StepTable``: one row of
constants per *network evaluation* (PLMS has one more evaluation than
steps). The driver scans over the rows; each iteration evaluates the network
once at ``state * in_scale`` and time ``t_model``, converts the output to a
``Denoised`` pair, and calls ``update``. Tables are computed inside the
compiled program from the (traced) schedule, in float32.
"""

import abc
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ldm_jax.diffusion.schedules import DiffusionSchedule
from ldm_jax.diffusion.thresholding import clip_x0, dynamic_threshold
from ldm_jax.diffusion.timesteps import GridKind, inference_timesteps

if TYPE_CHECKING:
  from ldm_jax.diffusion.config import SamplerConfig

Carry = dict[str, jax.Array]


@struct.dataclass
class StepTable:
  """Per-iteration constants; every field has a leading axis of length K (iterations)."""

  t_model: jax.Array  # timestep given to the network (float32, maybe fractional)
  in_scale: jax.Array  # network input = state * in_scale (1 for variance-preserving states)
  alpha_bar: jax.Array  # alpha_bar of the network input, to convert its output
  keep_scale: jax.Array  # level of the state after this iteration:
  keep_noise: jax.Array  #   keep_scale * x0 + keep_noise * noise (used by inpainting)
  coefs: dict[str, jax.Array]  # sampler-specific


class Denoised(NamedTuple):
  """A model output seen as both predictions; ``x0`` is already clipped / thresholded."""

  x0: jax.Array
  eps: jax.Array


class Sampler(abc.ABC):
  """One sampling algorithm, configured by a ``SamplerConfig``."""

  grid_kind: GridKind = "discrete"
  draws_noise: bool = False  # needs fresh Gaussian noise every iteration
  supports_eta: bool = False

  def __init__(self, config: "SamplerConfig"):
    self.config = config

  def timesteps(self, num_train: int) -> np.ndarray:
    """The full decreasing timestep grid, as the matching diffusers scheduler builds it."""
    c = self.config
    return inference_timesteps(num_train, c.num_steps, c.timestep_spacing, c.steps_offset, self.grid_kind)

  def process_x0(self, x0: jax.Array) -> jax.Array:
    """Applies the configured clipping or dynamic thresholding to a predicted x0."""
    c = self.config
    if c.threshold_percentile is not None:
      return dynamic_threshold(x0, c.threshold_percentile, c.threshold_max)
    if c.clip_x0 is not None:
      return clip_x0(x0, c.clip_x0)
    return x0

  def start_level(self, schedule: DiffusionSchedule, timesteps: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """``(a, s)`` such that the first state of an img2img run is ``a * x0 + s * noise``."""
    alpha_bar = schedule.alphas_cumprod[int(timesteps[0])]
    return jnp.sqrt(alpha_bar), jnp.sqrt(1.0 - alpha_bar)

  def init_noise_sigma(self, schedule: DiffusionSchedule, timesteps: np.ndarray) -> jax.Array:
    """Scale of unit Gaussian noise that starts a text-to-image run."""
    del schedule, timesteps
    return jnp.float32(1.0)

  def init_carry(self, x: jax.Array) -> Carry:
    return {"x": x}

  @abc.abstractmethod
  def table(self, schedule: DiffusionSchedule, timesteps: np.ndarray, eta: Any) -> StepTable:
    """Per-iteration constants for this (possibly img2img-shortened) grid."""

  @abc.abstractmethod
  def update(self, carry: Carry, pred: Denoised, row: StepTable, noise: jax.Array | None) -> Carry:
    """One iteration: the new carry from the network's prediction at ``row``."""


def alpha_bars_of(schedule: DiffusionSchedule, timesteps: np.ndarray) -> jax.Array:
  """``alpha_bar`` at integer timesteps, float32."""
  return schedule.alphas_cumprod[np.asarray(timesteps, np.int32)]


def next_alpha_bars(schedule: DiffusionSchedule, timesteps: np.ndarray, final: jax.Array) -> jax.Array:
  """``alpha_bar`` each step moves to: the next grid point's, then ``final`` after the last."""
  return jnp.append(alpha_bars_of(schedule, timesteps[1:]), jnp.asarray(final, jnp.float32))


def vp_table(
    timesteps: np.ndarray, alpha_bar: jax.Array, alpha_bar_next: jax.Array, coefs: dict[str, jax.Array]
) -> StepTable:
  """``StepTable`` of a variance-preserving sampler: the state is ``x_t`` itself."""
  return StepTable(
      t_model=jnp.asarray(timesteps, jnp.float32),
      in_scale=jnp.ones_like(alpha_bar),
      alpha_bar=alpha_bar,
      keep_scale=jnp.sqrt(alpha_bar_next),
      keep_noise=jnp.sqrt(1.0 - alpha_bar_next),
      coefs=coefs,
  )


def ddim_transfer(
    x0: jax.Array,
    eps: jax.Array,
    alpha_bar_next: jax.Array,
    sigma: jax.Array | float = 0.0,
    noise: jax.Array | None = None,
) -> jax.Array:
  """DDIM's move to level ``alpha_bar_next``: ``sqrt(a') x0 + sqrt(1 - a' - sigma^2) eps + sigma z``."""
  direction = jnp.sqrt(jnp.maximum(1.0 - alpha_bar_next - sigma**2, 0.0)) * eps
  x_next = jnp.sqrt(alpha_bar_next) * x0 + direction
  return x_next if noise is None else x_next + sigma * noise
