"""Benchmark entry point: ``python -m benchmarks.run --config tiny --baseline torch --out results.json``.

Prints a table and writes every figure, the machine and the command line to
``--out``. See BENCHMARKS.md for the flags and the recorded results.
"""

import argparse
import dataclasses
import os
import sys
import tempfile
from typing import Any

from benchmarks.settings import DTYPES, WORKLOADS, Settings


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
  p.add_argument("--config", default="tiny", help="tiny | sd15 | sd2")
  p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset of the default")
  p.add_argument("--batch", type=int, default=4, help="images per step (the sampler's UNet sees 2x with guidance)")
  p.add_argument("--image-size", type=int, default=64, help="pixels per side; latents are 1/8 of it")
  p.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype; params stay float32")
  p.add_argument("--steps", type=int, default=10, help="DDIM steps of the sampler workload")
  p.add_argument("--guidance-scale", type=float, default=7.5)
  p.add_argument("--attention-impl", default="auto", choices=("auto", "xla", "cudnn"))
  p.add_argument("--remat", default="none", choices=("none", "full", "save_dots"), help="UNet remat policy")
  p.add_argument("--repeats", type=int, default=5, help="timed calls per workload (the median is reported)")
  p.add_argument("--warmup", type=int, default=1, help="untimed calls before the timed ones")
  p.add_argument("--baseline", default="none", choices=("none", "torch"))
  p.add_argument("--torch-device", default=None, help="default: cuda if available, else cpu")
  p.add_argument("--cache-dir", default=None,
                 help="persistent compilation cache (default: a fresh temporary one, so 'cold' is cold)")
  p.add_argument("--profile-dir", default=None, help="also trace one step of each of our workloads (jax.profiler)")
  p.add_argument("--flops-only", action="store_true",
                 help="only count FLOPs per step, from shapes: no parameters are allocated, nothing runs")
  p.add_argument("--out", default=None, help="JSON results file")
  args = p.parse_args(argv)
  unknown = set(args.workloads.split(",")) - set(WORKLOADS)
  if unknown:
    p.error(f"unknown workloads {sorted(unknown)}; choose from {WORKLOADS}")
  return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  settings = Settings(
      config=args.config, batch=args.batch, image_size=args.image_size, dtype=args.dtype, steps=args.steps,
      guidance_scale=args.guidance_scale, attention_impl=args.attention_impl, remat_policy=args.remat,
  )
  from benchmarks.compilation import enable_persistent_cache
  from benchmarks.machine import machine_info
  from benchmarks.report import flops_table, table, write_json
  from benchmarks.suite import count_flops, run_suite

  names = [n for n in WORKLOADS if n in args.workloads.split(",")]
  report = dict(machine=machine_info(sys.argv[1:] if argv is None else argv), settings=dataclasses.asdict(settings))
  if args.flops_only:
    report["flops"] = count_flops(settings, names)
    print(flops_table(report["flops"]))
  else:
    with tempfile.TemporaryDirectory(prefix="ldm_jax_bench_cache_") as scratch:
      cache_dir = os.path.abspath(args.cache_dir or scratch)
      enable_persistent_cache(cache_dir)
      report.update(
          run_suite(settings, names, repeats=args.repeats, warmup=args.warmup, baseline=args.baseline,
                    torch_device=args.torch_device, profile_dir=args.profile_dir),
          cache_dir=args.cache_dir or "(temporary, removed)",
      )
    report["load_average_end"] = os.getloadavg()
    print(table(report["results"]))
  write_json(args.out, report)
  return report


if __name__ == "__main__":
  main()
