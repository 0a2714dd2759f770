"""Measuring a workload: ours (cold/warm compile, step times, FLOPs, MFU, memory) and an eager baseline's."""

import os
from collections.abc import Callable
from typing import Any

import jax

from benchmarks.compilation import (
    attention_kind,
    compile_cold_and_warm,
    compile_timed,
    custom_call_targets,
    flops,
    hlo_text,
    kernel_counts,
    memory_bytes,
    peak_device_bytes,
)
from benchmarks.peaks import device_peak_flops, mfu
from benchmarks.timing import summarize, time_steps
from benchmarks.workloads import Workload


def throughput(images: int, flops_per_step: float | None, seconds: float, peak: float | None) -> dict[str, Any]:
  """images/s, FLOP/s and MFU of a step taking ``seconds``."""
  return dict(
      images_per_s=images / seconds,
      flop_per_s=flops_per_step / seconds if flops_per_step else None,
      mfu=mfu(flops_per_step, seconds, peak),
  )


def workload_flops(w: Workload, stage: Any | None = None) -> float | None:
  """FLOPs of one call of ``w``: XLA's count for ``stage`` (default: lowered now) plus its loop trips."""
  stage = stage if stage is not None else jax.jit(w.fn).lower(*w.args)
  counted = flops(stage)
  extra = w.loop_flops() if (counted and w.loop_flops) else 0.0
  return None if counted is None or extra is None else counted + extra


def measure_workload(w: Workload, *, repeats: int, warmup: int, profile_dir: str | None = None,
                     warm_compile: bool = True) -> dict[str, Any]:
  """Compiles ``w`` cold then warm, runs the warm executable ``warmup + repeats`` times.

  With ``profile_dir``, one more (untimed) call is traced with ``jax.profiler``
  into ``profile_dir/<workload>`` (view with TensorBoard or xprof). Without
  ``warm_compile`` it compiles once (the warm figures are None) and runs that.
  """
  if warm_compile:
    cold, warm = compile_cold_and_warm(w.fn, w.args, w.donate_argnums)
  else:
    cold = warm = compile_timed(w.fn, w.args, w.donate_argnums)
  step_flops = workload_flops(w, cold.executable)
  executable, args = warm.executable, list(w.args)

  def step() -> None:
    out = jax.block_until_ready(executable(*args))
    if w.next_args:
      args[:] = w.next_args(tuple(args), out)

  cpu_times: list[float] = []
  times = time_steps(step, repeats, warmup, cpu_times)
  if profile_dir:
    with jax.profiler.trace(os.path.join(profile_dir, w.name)):
      step()
  stats = summarize(times)
  text = hlo_text(cold.executable)
  return dict(
      workload=w.name,
      images_per_step=w.images,
      compile_cold_s=cold.seconds,
      compile_warm_s=warm.seconds if warm_compile else None,
      compile_breakdown_s={
          f"{name}_{stage}": round(getattr(c, f"{stage}_s"), 4)
          for name, c in (("cold", cold), ("warm", warm)) if name == "cold" or warm_compile
          for stage in ("trace", "lower", "compile")
      },
      cold_cache_hit=cold.cache_hits > 0,  # True only when --cache-dir already held this program
      warm_cache_hit=warm.cache_hits > 0 if warm_compile else None,
      **stats,
      times_s=times,
      cpu_over_wall=sum(cpu_times) / sum(times),
      flops_per_step=step_flops,
      **throughput(w.images, step_flops, stats["median_s"], device_peak_flops()),
      xla_memory_bytes=memory_bytes(executable),
      hlo_kernels=kernel_counts(cold.executable),
      attention_ran=attention_kind(text) if text else None,  # cuDNN fused attention or XLA dot + softmax
      custom_calls=custom_call_targets(text) if text else None,
      peak_device_bytes=peak_device_bytes(),
  )


def measure_eager(
    name: str,
    step: Callable[[], None],
    images: int,
    *,
    repeats: int,
    warmup: int,
    flops_per_step: float | None,
    peak: float | None,
    peak_memory: Callable[[], int | None] = lambda: None,
) -> dict[str, Any]:
  """Times an eagerly executed step (the PyTorch baseline): its first call, then ``repeats`` calls.

  The first call (reported as ``first_call_s``) counts as one of the
  ``warmup`` calls. FLOPs are our program's count (same architecture).
  """
  first = time_steps(step, 1, warmup=0)[0]
  cpu_times: list[float] = []
  times = time_steps(step, repeats, max(warmup - 1, 0), cpu_times)
  stats = summarize(times)
  return dict(
      workload=name,
      images_per_step=images,
      first_call_s=first,
      **stats,
      times_s=times,
      cpu_over_wall=sum(cpu_times) / sum(times),
      flops_per_step=flops_per_step,
      **throughput(images, flops_per_step, stats["median_s"], peak),
      peak_device_bytes=peak_memory(),
  )
