"""Compiling a jitted program cold and warm (from the persistent cache), and what XLA says about it."""

import dataclasses
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import jax

_HIT = "/jax/compilation_cache/cache_hits"
_MISS = "/jax/compilation_cache/cache_misses"
_events: Counter = Counter()
_listening = False


def enable_persistent_cache(path: str) -> None:
  """Caches every compiled program under ``path`` (also fast ones, and on CPU).

  Call before the first compilation. Hits and misses are counted from JAX's
  monitoring events, so a "warm" time is only reported as such when it hit.
  """
  global _listening
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  if not _listening:
    jax.monitoring.register_event_listener(lambda name, **_: _events.update([name]))
    _listening = True


@dataclasses.dataclass
class Compiled:
  """A compiled program and how long tracing, lowering and compiling it took."""

  executable: Any  # jax.stages.Compiled
  trace_s: float  # Python tracing to a jaxpr
  lower_s: float  # jaxpr -> StableHLO
  compile_s: float  # XLA compilation, or loading from the persistent cache
  cache_hits: int
  cache_misses: int

  @property
  def seconds(self) -> float:
    return self.trace_s + self.lower_s + self.compile_s


def compile_timed(fn: Callable, args: Sequence[Any], donate_argnums: tuple[int, ...] = ()) -> Compiled:
  """Traces, lowers and compiles ``jax.jit(fn)`` for ``args``, timing each stage."""
  before = Counter(_events)
  t0 = time.perf_counter()
  traced = jax.jit(fn, donate_argnums=donate_argnums).trace(*args)
  t1 = time.perf_counter()
  lowered = traced.lower()
  t2 = time.perf_counter()
  executable = lowered.compile()
  t3 = time.perf_counter()
  return Compiled(executable, t1 - t0, t2 - t1, t3 - t2, _events[_HIT] - before[_HIT], _events[_MISS] - before[_MISS])


def compile_cold_and_warm(
    fn: Callable, args: Sequence[Any], donate_argnums: tuple[int, ...] = ()
) -> tuple[Compiled, Compiled]:
  """Compiles twice: cold, then warm after ``jax.clear_caches()`` (a persistent-cache hit)."""
  cold = compile_timed(fn, args, donate_argnums)
  jax.clear_caches()
  warm = compile_timed(fn, args, donate_argnums)
  return cold, warm


def _first(analysis: Any) -> dict[str, Any] | None:
  # cost_analysis() is a dict in recent jax, a list with one dict per program in older ones.
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  return analysis


def flops(stage: Any) -> float | None:
  """FLOPs XLA counts for a ``Lowered`` or ``Compiled`` program.

  XLA counts the body of a while loop (``lax.scan``) once, whatever its trip
  count: scale loop bodies yourself.
  """
  try:
    analysis = _first(stage.cost_analysis())
  except Exception:  # some backends do not implement it
    return None
  value = (analysis or {}).get("flops")
  return float(value) if value and value > 0 else None


def lowered_flops(fn: Callable, args: Sequence[Any]) -> float | None:
  """FLOPs of ``jax.jit(fn)`` at ``args`` from the lowered (not compiled) program: cheap."""
  return flops(jax.jit(fn).lower(*args))


def memory_bytes(executable: Any) -> dict[str, int] | None:
  """XLA's static buffer sizes of a compiled program (arguments, outputs, temporaries)."""
  try:
    stats = executable.memory_analysis()
  except Exception:
    return None
  if stats is None:
    return None
  names = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")
  return {name.removesuffix("_size_in_bytes"): int(getattr(stats, name)) for name in names}


def peak_device_bytes(device: jax.Device | None = None) -> int | None:
  """The device's peak bytes in use so far in this process (None where unreported, e.g. CPU)."""
  stats = (device or jax.devices()[0]).memory_stats()
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


_FREE_OPS = frozenset({"parameter", "constant", "bitcast", "get-tuple-element", "tuple"})
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*\S+\s+([a-z][a-z0-9-]*)\(")


def hlo_text(executable: Any) -> str | None:
  """The compiled program's HLO text (None where the backend does not give it)."""
  try:
    return executable.as_text()
  except Exception:
    return None


def kernel_counts(executable: Any) -> dict[str, int] | None:
  """Opcodes of the compiled HLO outside fusion bodies: roughly the kernels one call launches.

  Many ``copy``/``transpose`` entries point at layout changes, many small
  fusions at missed fusion opportunities.
  """
  text = hlo_text(executable)
  if text is None:
    return None
  counts: Counter = Counter()
  top_level = False
  for line in text.splitlines():
    if line.endswith("{") and "=" not in line.split("(")[0]:  # a computation's header
      name = line.split()[1] if line.startswith("ENTRY") else line.split()[0]
      top_level = not any(tag in name for tag in ("fused", "wrapped", "region_"))
      continue
    match = _INSTRUCTION.match(line)
    if top_level and match and match.group(1) not in _FREE_OPS:
      counts[match.group(1)] += 1
  return dict(counts.most_common())


# One operation per line in MLIR's printed form: `%r = dialect.op ...`, `%r:2 = "dialect.op"(...)`, or no result.
_MLIR_OP = re.compile(r'^\s*(?:%[^=]*=\s*)?"?([a-z_]+\.[a-z_][a-z0-9_.]*)"?[\s(<{]', re.M)
_CUSTOM_CALL = re.compile(r'custom_call @"?([^\s("]+)'  # StableHLO, pretty form
                          r'|call_target_name = "([^"]+)"'  # StableHLO, generic form
                          r'|custom_call_target="([^"]+)"')  # compiled HLO
CUDNN_ATTENTION = "__cudnn$fmha"  # the prefix of cuDNN's fused attention custom-call targets


def mlir_op_counts(text: str) -> dict[str, int]:
  """Operations of an MLIR module's text (``Exported.mlir_module()``) by name, most frequent first.

  Operations inside regions (loop, conditional and reduction bodies) are
  counted once each, as written: a loop body is not multiplied by its trips.
  """
  return dict(Counter(_MLIR_OP.findall(text)).most_common())


def custom_call_targets(text: str) -> dict[str, int]:
  """Custom-call targets in StableHLO or compiled HLO text, with their counts."""
  return dict(Counter(next(g for g in m.groups() if g) for m in _CUSTOM_CALL.finditer(text)).most_common())


def attention_kind(text: str) -> str:
  """``"cudnn"`` when a program (StableHLO or compiled HLO text) calls cuDNN's fused attention,
  else ``"xla"`` (XLA's dot + softmax)."""
  return "cudnn" if CUDNN_ATTENTION in text else "xla"
