"""What issue 8's H100 targets mean in step time, from a ``--flops-only`` report of SD 1.5 at 512x512.

``python -m benchmarks.targets benchmarks/results/cpu_sd15_512_flops.json`` prints a
Markdown table. It is arithmetic on FLOP counts (FLOPs / (MFU x peak)), not a measurement.
"""

import json
import sys
from typing import Any

from benchmarks.peaks import peak_flops

DEVICE = "NVIDIA H100 80GB HBM3"  # SXM: the target chip
# (workload, batch, MFU to reach, step time to reach in seconds); exactly one of the last two is given.
TARGETS: tuple[tuple[str, int, float | None, float | None], ...] = (
    ("unet_train", 8, 0.40, None),
    ("sampler", 8, 0.45, None),
    ("sampler_step", 1, None, 0.015),
)


def target_rows(report: dict[str, Any], device: str = DEVICE) -> list[dict[str, Any]]:
  """Step time at the MFU target, or MFU at the step-time target, of each ``TARGETS`` row."""
  peak = peak_flops(device)
  per_image = {row["workload"]: row["flops_per_image"] for row in report["flops"]}
  rows = []
  for name, batch, mfu, seconds in TARGETS:
    step = per_image[name] * batch  # FLOPs grow linearly with the batch
    if seconds is None:
      seconds = step / (mfu * peak)
    else:
      mfu = step / seconds / peak
    rows.append(dict(workload=name, batch=batch, flops_per_step=step, mfu=mfu, seconds=seconds))
  return rows


def markdown(report: dict[str, Any], device: str = DEVICE) -> str:
  s = report["settings"]
  lines = [
      f"Arithmetic, not measurements: {s['config']} at {s['image_size']}x{s['image_size']}, {s['steps']} sampler "
      f"steps, {device} at {peak_flops(device) / 1e12:.0f} TFLOP/s dense bf16.", "",
      "| workload | batch | TFLOP per step | MFU | step time |", "|---|---|---|---|---|",
  ]
  for r in target_rows(report, device):
    lines.append(f"| {r['workload']} | {r['batch']} | {r['flops_per_step'] / 1e12:.2f} | {100 * r['mfu']:.1f}% | "
                 f"{1e3 * r['seconds']:.1f} ms |")
  return "\n".join(lines)


if __name__ == "__main__":
  with open(sys.argv[1]) as f:
    print(markdown(json.load(f)))
