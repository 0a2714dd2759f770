"""The benchmark suite: our workloads, the PyTorch baseline's, FLOP counts, and their pairing."""

import gc
import importlib.util
import sys
from typing import Any

from benchmarks.machine import usable_cores
from benchmarks.measure import measure_eager, measure_workload, workload_flops
from benchmarks.peaks import peak_flops
from benchmarks.settings import Settings
from benchmarks.workloads import BUILDERS, Models


def run_ours(settings: Settings, names: list[str], repeats: int, warmup: int,
             profile_dir: str | None = None) -> dict[str, dict[str, Any]]:
  """Measures our workloads ``names`` in order, on one set of models."""
  models, results = Models(settings), {}
  for name in names:
    print(f"[ours] {name} ...", file=sys.stderr, flush=True)
    results[name] = measure_workload(BUILDERS[name](models), repeats=repeats, warmup=warmup,
                                     profile_dir=profile_dir)
    gc.collect()  # drop the workload's state (e.g. the optimiser's) before the next one
  return results


def count_flops(settings: Settings, names: list[str]) -> list[dict[str, Any]]:
  """FLOPs per step and per image of each workload, from the lowered programs (nothing allocated)."""
  models, rows = Models(settings, abstract=True), []
  for name in names:
    w = BUILDERS[name](models)
    step = workload_flops(w)
    rows.append(dict(workload=name, images_per_step=w.images, flops_per_step=step,
                     flops_per_image=step and step / w.images))
  return rows


def run_torch(settings: Settings, names: list[str], repeats: int, warmup: int, device: str | None,
              flops: dict[str, float | None], cores: int) -> tuple[dict[str, dict[str, Any]], str]:
  """Measures the PyTorch baseline of ``names``; ``flops`` are our counts (same architecture)."""
  import torch  # optional: the parity extra

  from benchmarks import torch_baseline as tb

  torch.set_num_threads(cores)  # as many threads as XLA's CPU thread pool
  device = device or tb.default_device()
  torch.backends.cudnn.benchmark = True  # the fastest conv algorithms, as a tuned PyTorch job would
  kind = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
  peak = None if kind == "cpu" else peak_flops(kind)
  models, results = tb.TorchModels(settings, device), {}
  for name in names:
    print(f"[torch] {name} ...", file=sys.stderr, flush=True)
    tb.reset_peak_memory(device)
    w = tb.BUILDERS[name](models)
    results[name] = measure_eager(name, w.step, w.images, repeats=repeats, warmup=warmup,
                                  flops_per_step=flops.get(name), peak=peak,
                                  peak_memory=lambda: tb.peak_memory_bytes(device))
    del w
    gc.collect()
  return results, f"torch {torch.__version__} on {kind}, {torch.get_num_threads()} threads"


def run_suite(
    settings: Settings,
    names: list[str],
    *,
    repeats: int,
    warmup: int,
    baseline: str = "none",
    torch_device: str | None = None,
    profile_dir: str | None = None,
) -> dict[str, Any]:
  """Runs our workloads, then the baseline's; each result pairs them with ``ours_over_ref``.

  ``ours_over_ref`` is our median step time over the baseline's: below 1, ours is faster.
  """
  ours = run_ours(settings, names, repeats, warmup, profile_dir)
  ref, ref_name, notes = {}, None, []
  if baseline == "torch":
    if importlib.util.find_spec("torch") and importlib.util.find_spec("diffusers"):
      flops = {name: r["flops_per_step"] for name, r in ours.items()}
      ref, ref_name = run_torch(settings, names, repeats, warmup, torch_device, flops, usable_cores())
    else:
      notes.append("torch baseline skipped: torch and diffusers are not installed (pip install '.[parity]')")
      print(notes[-1], file=sys.stderr)
  results = []
  for name in names:
    r = ref.get(name)
    results.append(dict(workload=name, ours=ours[name], ref=r, ref_name="torch" if r else None,
                        ours_over_ref=ours[name]["median_s"] / r["median_s"] if r else None))
  return dict(repeats=repeats, warmup=warmup, baseline=ref_name, notes=notes, results=results)
