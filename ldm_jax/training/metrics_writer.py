"""Metrics to stdout, ``metrics.jsonl`` and TensorBoard, from process 0 only.

A resumed run replays the steps after its checkpoint: ``resume_at`` drops
what was logged for them, so each step appears once, as in the run the
checkpoints describe.
"""

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
    self._path = os.path.join(workdir, "metrics.jsonl")
    self._tb_dir = os.path.join(workdir, "tensorboard") if tensorboard else None
    self._purge_step = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(self._path, "a")

  def _tensorboard(self):
    """The TensorBoard writer, opened on first use (after ``resume_at``, with its purge step)."""
    if self._tb is None and self._tb_dir is not None:
      from tensorboardX import SummaryWriter  # imported lazily: optional at sample time

      self._tb = SummaryWriter(self._tb_dir, purge_step=self._purge_step)
    return self._tb

  def resume_at(self, step: int) -> None:
    """Forgets every record after ``step`` in ``metrics.jsonl`` (and in TensorBoard, which
    hides events from ``step + 1`` on logged before the restart)."""
    if not self.active:
      return
    self._jsonl.close()
    with open(self._path) as f:
      lines = f.readlines()
    kept = []
    for line in lines:
      try:
        if int(json.loads(line)["step"]) <= step:
          kept.append(line.rstrip("\n") + "\n")
      except (ValueError, KeyError, TypeError):  # a line cut short by a kill
        pass
    if kept != lines:
      logging.info("metrics.jsonl: dropping %d records after step %d, which this run repeats", len(lines) - len(kept),
                   step)
      with open(self._path + ".tmp", "w") as f:
        f.writelines(kept)
      os.replace(self._path + ".tmp", self._path)
    self._jsonl = open(self._path, "a")
    self._purge_step = step + 1
    if self._tb is not None:  # reopen with the purge step
      self._tb.close()
      self._tb = None

  def scalars(self, step: int, metrics: dict[str, Any], *, echo: bool = True) -> None:
    if not self.active:
      return
    clean = {k: float(np.asarray(v)) for k, v in metrics.items() if np.ndim(v) == 0}
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._jsonl.flush()
    if self._tensorboard() is not None:
      for k, v in clean.items():
        self._tb.add_scalar(k, v, step)
    if echo:
      logging.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in sorted(clean.items())))

  def image(self, step: int, name: str, image_HxWx3: np.ndarray) -> None:
    """``image`` is uint8 HWC."""
    if self.active and self._tensorboard() is not None:
      self._tb.add_image(name, image_HxWx3, step, dataformats="HWC")

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
