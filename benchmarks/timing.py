"""Framework-agnostic step timing: warm-up, repeated runs, summary statistics."""

import statistics
import time
from collections.abc import Callable


def time_steps(step: Callable[[], None], repeats: int, warmup: int = 1,
               cpu_times: list[float] | None = None) -> list[float]:
  """Seconds of each of ``repeats`` calls of ``step`` after ``warmup`` untimed ones.

  ``step`` must return only once its work is done (``block_until_ready``,
  ``torch.cuda.synchronize``). With ``cpu_times``, the process's CPU seconds
  (all threads) of each call are appended to it: on a shared machine a step
  whose CPU time is far below its wall time was waiting for a core.
  """
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats}")
  for _ in range(warmup):
    step()
  times = []
  for _ in range(repeats):
    start, cpu_start = time.perf_counter(), time.process_time()
    step()
    times.append(time.perf_counter() - start)
    if cpu_times is not None:
      cpu_times.append(time.process_time() - cpu_start)
  return times


def summarize(times: list[float]) -> dict[str, float]:
  """Median (the headline figure), min, mean and standard deviation, in seconds."""
  return dict(
      median_s=statistics.median(times),
      min_s=min(times),
      mean_s=statistics.fmean(times),
      stdev_s=statistics.stdev(times) if len(times) > 1 else 0.0,
  )


def timed(fn: Callable[[], object]) -> tuple[object, float]:
  """``(fn(), seconds)``."""
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start
