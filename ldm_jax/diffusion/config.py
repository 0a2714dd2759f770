"""``SamplerConfig``: everything about a sampling run that fixes the compiled program.

It is frozen and hashable, so it is a static argument of the jitted driver;
values that may change from call to call without recompiling (guidance
scale, eta, seed, conditioning, params) are arguments of ``sample`` instead.
Defaults are Stable Diffusion's scheduler config: ``leading`` spacing with
``steps_offset = 1`` and ``set_alpha_to_one = False``.
"""

import dataclasses

from ldm_jax.diffusion.parameterization import canonical_prediction_type
from ldm_jax.diffusion.samplers import DDPM_VARIANCES, SAMPLERS, Sampler
from ldm_jax.diffusion.timesteps import SPACINGS


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Static settings of a sampling run.

  Attributes:
    sampler: one of ``ddpm, ddim, plms, pndm, dpmpp_2m, euler, euler_ancestral``.
    num_steps: number of sampler steps (PLMS evaluates the network once more).
    timestep_spacing: ``leading`` | ``trailing`` | ``linspace``, as diffusers.
    steps_offset: added to ``leading`` timesteps (SD: 1).
    prediction_type: what the network outputs: ``eps`` | ``x0`` | ``v``
      (diffusers' ``epsilon`` / ``sample`` / ``v_prediction`` are accepted).
    set_alpha_to_one: DDIM / PLMS end at alpha_bar 1 instead of alpha_bar[0].
    ddpm_variance: ``fixed_small`` (posterior variance) | ``fixed_large`` (beta).
    clip_x0: clip predicted x0 to ``[-clip_x0, clip_x0]`` (None: no clipping).
    threshold_percentile: Imagen dynamic thresholding percentile (e.g. 0.995);
      None disables it. Not combinable with ``clip_x0``.
    threshold_max: upper bound of the dynamic threshold ``s``.
    guidance_interval: ``(low, high)``: classifier-free guidance only at
      model timesteps ``low <= t <= high``, the conditional output alone
      elsewhere (Kynkaanniemi et al. 2024, "Applying guidance in a limited
      interval"); the unconditional pass is skipped outside it. None: every
      step.
  """

  sampler: str = "ddim"
  num_steps: int = 50
  timestep_spacing: str = "leading"
  steps_offset: int = 1
  prediction_type: str = "eps"
  set_alpha_to_one: bool = False
  ddpm_variance: str = "fixed_small"
  clip_x0: float | None = None
  threshold_percentile: float | None = None
  threshold_max: float = 1.0
  guidance_interval: tuple[float, float] | None = None

  def __post_init__(self):
    if self.sampler not in SAMPLERS:
      raise ValueError(f"unknown sampler {self.sampler!r}; expected one of {sorted(SAMPLERS)}")
    if not isinstance(self.num_steps, int) or self.num_steps <= 0:
      raise ValueError(f"num_steps must be a positive integer, got {self.num_steps!r}")
    if self.timestep_spacing not in SPACINGS:
      raise ValueError(f"unknown timestep_spacing {self.timestep_spacing!r}; expected one of {SPACINGS}")
    if self.steps_offset < 0:
      raise ValueError(f"steps_offset must be >= 0, got {self.steps_offset}")
    object.__setattr__(self, "prediction_type", canonical_prediction_type(self.prediction_type))
    if self.ddpm_variance not in DDPM_VARIANCES:
      raise ValueError(f"unknown ddpm_variance {self.ddpm_variance!r}; expected one of {DDPM_VARIANCES}")
    if self.clip_x0 is not None and self.clip_x0 <= 0:
      raise ValueError(f"clip_x0 must be positive or None, got {self.clip_x0}")
    if self.threshold_percentile is not None:
      if not 0.0 < self.threshold_percentile <= 1.0:
        raise ValueError(f"threshold_percentile must be in (0, 1], got {self.threshold_percentile}")
      if self.clip_x0 is not None:
        raise ValueError("set either clip_x0 or threshold_percentile, not both")
    if self.threshold_max < 1.0:
      raise ValueError(f"threshold_max must be >= 1, got {self.threshold_max}")
    if self.guidance_interval is not None:
      interval = tuple(float(v) for v in self.guidance_interval)
      if len(interval) != 2 or not 0.0 <= interval[0] <= interval[1]:
        raise ValueError(f"guidance_interval must be (low, high) timesteps with 0 <= low <= high, "
                         f"got {self.guidance_interval!r}")
      object.__setattr__(self, "guidance_interval", interval)

  def make_sampler(self) -> Sampler:
    """The configured ``Sampler``."""
    return SAMPLERS[self.sampler](self)


def parse_guidance_interval(values) -> tuple[float, float]:
  """``--guidance_interval LOW,HIGH`` (strings or numbers) as two floats, or a
  ValueError naming the flag."""
  try:
    low, high = (float(v) for v in values)
  except (TypeError, ValueError):
    raise ValueError(f"--guidance_interval takes LOW,HIGH (two timesteps), got {values!r}") from None
  if not 0.0 <= low <= high:
    raise ValueError(f"--guidance_interval needs 0 <= LOW <= HIGH, got {low:g},{high:g}")
  return low, high
