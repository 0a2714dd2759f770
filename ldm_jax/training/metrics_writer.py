"""Metrics to stdout, ``metrics.jsonl`` and TensorBoard, from process 0 only."""

import json
import logging
import os
from typing import Any

import jax
import numpy as np


class MetricWriter:
  """Writes scalar metrics and images for one run directory."""

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    if tensorboard:
      from tensorboardX import SummaryWriter  # imported lazily: optional at sample time

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def scalars(self, step: int, metrics: dict[str, Any], *, echo: bool = True) -> None:
    if not self.active:
      return
    clean = {k: float(np.asarray(v)) for k, v in metrics.items() if np.ndim(v) == 0}
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in clean.items():
        self._tb.add_scalar(k, v, step)
    if echo:
      logging.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in sorted(clean.items())))

  def image(self, step: int, name: str, image_HxWx3: np.ndarray) -> None:
    """``image`` is uint8 HWC."""
    if self.active and self._tb is not None:
      self._tb.add_image(name, image_HxWx3, step, dataformats="HWC")

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
