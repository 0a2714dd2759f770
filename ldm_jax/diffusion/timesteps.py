"""Inference timestep grids, exactly as diffusers' schedulers lay them out.

Three spacings (Lin et al. 2023, table 2), each in three flavours because the
diffusers schedulers differ:

- ``"discrete"`` (DDPM, DDIM, PNDM/PLMS): integer timesteps.
- ``"sigma"`` (Euler, Euler ancestral): float timesteps; ``linspace`` is not
  rounded, so sigmas are interpolated between table entries.
- ``"dpm_solver"`` (DPM-Solver multistep): ``linspace`` and ``leading`` lay
  out ``N + 1`` points and drop the last one.

The LDM reference's ``make_ddim_timesteps("uniform")`` is ``leading`` with
``steps_offset = 1``.
"""

from typing import Literal

import numpy as np

SPACINGS = ("leading", "trailing", "linspace")
GridKind = Literal["discrete", "sigma", "dpm_solver"]


def _leading(num_train: int, num_steps: int, points: int, steps_offset: int) -> np.ndarray:
  ratio = num_train // points
  return (np.arange(points) * ratio).round()[::-1][:num_steps].astype(np.float64) + steps_offset


def _trailing(num_train: int, num_steps: int) -> np.ndarray:
  # diffusers writes np.arange(T, 0, -T/N); that fills start + i * step, as here,
  # but may yield N + 1 points from rounding, so we take i < N explicitly.
  return np.round(num_train - np.arange(num_steps) * (num_train / num_steps)) - 1


def inference_timesteps(
    num_train: int,
    num_steps: int,
    spacing: str = "leading",
    steps_offset: int = 0,
    kind: GridKind = "discrete",
) -> np.ndarray:
  """Decreasing timesteps of an ``num_steps``-step sampler over a ``num_train``-step diffusion.

  Returns int64 for ``kind="discrete"``/``"dpm_solver"`` and float32 for ``"sigma"``.
  """
  if num_steps <= 0:
    raise ValueError(f"num_steps must be a positive integer, got {num_steps}")
  if num_steps > num_train:
    raise ValueError(f"num_steps={num_steps} cannot exceed the number of training timesteps {num_train}")
  if spacing not in SPACINGS:
    raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")
  points = num_steps + 1 if kind == "dpm_solver" else num_steps
  if spacing == "linspace":
    grid = np.linspace(0, num_train - 1, points)[::-1][:num_steps]
    if kind != "sigma":
      grid = grid.round()
  elif spacing == "leading":
    grid = _leading(num_train, num_steps, points, steps_offset)
  else:
    grid = _trailing(num_train, num_steps)
  if grid.min() < 0 or grid.max() > num_train - 1:
    raise ValueError(
        f"num_steps={num_steps}, spacing={spacing!r}, steps_offset={steps_offset} give timesteps "
        f"outside [0, {num_train - 1}]: {grid.min()}..{grid.max()}"
    )
  return grid.astype(np.float32) if kind == "sigma" else grid.astype(np.int64)
