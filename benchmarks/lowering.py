"""SD 1.5's training step and sampler lowered for TPU and GPU on any host: ``python -m benchmarks.lowering``.

Exports (``jax.export``) the full-size programs of ``benchmarks/workloads.py``
from shapes only (``Models(..., abstract=True)``: no weights, nothing computed
or compiled) for ``tpu``, for ``cuda`` and for both in one module, and
counts what each StableHLO module holds: operations by name and custom calls.
An operation without a lowering rule for a platform fails here, on a CPU.

Attention: ``attention_impl="auto"`` is resolved when the program is traced,
from the host's default backend, so on a CPU host it is XLA's whatever the
target platform. cuDNN's fused attention (``"cudnn"``) needs the cuDNN library
at trace time; the ``stand_in`` rows stub jax's cuDNN version and
compute-capability queries (and our ``_gpu_kind``) to trace as on an H100,
which shows the custom calls a GPU host would lower. They are labelled: a
stand-in is not a GPU.

  python -m benchmarks.lowering --out benchmarks/results/lowering_sd15.json
  python -m benchmarks.lowering --markdown benchmarks/results/lowering_sd15.json   # the table again
"""

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Iterator
from typing import Any
from unittest import mock

import jax
from jax import export

from benchmarks.compilation import CUDNN_ATTENTION, attention_kind, custom_call_targets, mlir_op_counts
from benchmarks.machine import machine_info
from benchmarks.report import write_json
from benchmarks.settings import Settings
from benchmarks.workloads import BUILDERS, Models
from ldm_jax.nn import attention

PROGRAMS = ("unet_train", "sampler")
STAND_IN_KIND = "nvidia h100 80gb hbm3"
STAND_IN_CUDNN = 91000  # 9.10
STAND_IN = f"H100 (compute capability 9.0), cuDNN {STAND_IN_CUDNN // 10000}.{STAND_IN_CUDNN // 100 % 100}"
# jax.export refuses custom calls without a compatibility guarantee unless told; cuDNN's are such.
CUDNN_TARGETS = tuple(f"{CUDNN_ATTENTION}{name}" for name in (
    "Softmax", "SoftmaxBackward", "ScaleBiasSoftmax", "ScaleBiasSoftmaxBackward"))
# (program, platforms, attention_impl, stand_in)
VARIANTS: tuple[tuple[str, tuple[str, ...], str, bool], ...] = (
    *((p, plats, "auto", False) for p in PROGRAMS for plats in (("tpu",), ("cuda",), ("tpu", "cuda"))),
    *((p, ("cuda",), "cudnn", False) for p in PROGRAMS),
    *((p, ("cuda",), impl, True) for p in PROGRAMS for impl in ("cudnn", "auto")),
)
_KEY_OPS = ("dot_general", "convolution", "while", "case", "custom_call")


@contextlib.contextmanager
def stand_in_h100() -> Iterator[None]:
  """Traces as on an H100 with cuDNN: jax's cuDNN queries and our GPU check answer as there."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # private: the stand-in, nothing else

  with (mock.patch.object(cudnn, "check_cudnn_version", lambda: STAND_IN_CUDNN),
        mock.patch.object(cudnn, "check_compute_capability", lambda capability: float(capability) <= 9.0),
        mock.patch.object(attention, "_gpu_kind", lambda: STAND_IN_KIND)):
    yield


def lower(settings: Settings, program: str, platform_sets: list[tuple[str, ...]], stand_in: bool) -> list[dict]:
  """Exports one program for each of ``platform_sets`` and counts its operations.

  One row per platform set; an error is recorded in the row, not raised.
  """
  jax.clear_caches()  # the attention choice is made while tracing: never reuse another variant's trace
  rows = []
  with stand_in_h100() if stand_in else contextlib.nullcontext():
    w = None
    for platforms in platform_sets:
      row: dict[str, Any] = dict(program=program, platforms=list(platforms), attention=settings.attention_impl,
                                 stand_in=STAND_IN if stand_in else None)
      start = time.perf_counter()
      try:
        w = w or BUILDERS[program](Models(settings, abstract=True))  # one function: its trace is reused
        checks = [export.DisabledSafetyCheck.custom_call(t) for t in CUDNN_TARGETS]
        exported = export.export(jax.jit(w.fn, donate_argnums=w.donate_argnums), platforms=platforms,
                                 disabled_checks=checks)(*w.args)
        text = exported.mlir_module()
      except Exception as e:  # noqa: BLE001 - what did not lower is the finding
        rows.append(dict(row, lowered=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
                         export_s=time.perf_counter() - start))
        continue
      ops = mlir_op_counts(text)
      rows.append(dict(row, lowered=True, error=None, export_s=time.perf_counter() - start, mlir_chars=len(text),
                       ops_total=sum(ops.values()), attention_ran=attention_kind(text),
                       custom_calls=custom_call_targets(text), ops=ops))
  return rows


def run(settings: Settings, programs: tuple[str, ...] = PROGRAMS) -> list[dict[str, Any]]:
  """Every variant of ``VARIANTS`` for ``programs``, in order."""
  groups: dict[tuple[str, str, bool], list[tuple[str, ...]]] = {}
  for program, platforms, impl, stand_in in VARIANTS:
    if program in programs:
      groups.setdefault((program, impl, stand_in), []).append(platforms)
  rows = []
  for (program, impl, stand_in), platform_sets in groups.items():
    print(f"[lowering] {program}, attention {impl}{' (stand-in)' if stand_in else ''}: "
          f"{', '.join('+'.join(p) for p in platform_sets)}", file=sys.stderr, flush=True)
    rows += lower(dataclasses.replace(settings, attention_impl=impl), program, platform_sets, stand_in)
  return rows


def markdown(report: dict[str, Any]) -> str:
  s = report["settings"]
  head = ["program", "platforms", "attention", "lowered", "ops", *_KEY_OPS[:-1], "custom calls", "export s"]
  lines = [f"{s['config']}, {s['image_size']}x{s['image_size']}, batch {s['batch']}, {s['dtype']}, "
           f"{s['steps']} sampler steps; operations of the exported StableHLO (loop bodies counted once):", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in report["rows"]:
    cells = [r["program"], "+".join(r["platforms"]), r["attention"] + (" (stand-in)" if r["stand_in"] else "")]
    if r["lowered"]:
      calls = ", ".join(f"`{t}` ×{n}" for t, n in r["custom_calls"].items()) or "none"
      counts = [str(r["ops"].get(f"stablehlo.{op}", 0)) for op in _KEY_OPS[:-1]]
      cells += ["yes", str(r["ops_total"]), *counts, calls]
    else:
      cells += ["**no**: " + r["error"].replace("|", "\\|"), *[""] * (len(head) - 5)]
    lines.append("| " + " | ".join([*cells, f"{r['export_s']:.1f}"]) + " |")
  m = report["machine"]
  lines += ["", f"`{m['command']}` — {m['cpu']}, {m['cores']} cores, jax {m['versions']['jax']}; git {m['git']}. "
            f"Stand-in: {STAND_IN}, traced on this CPU with jax's cuDNN queries stubbed."]
  return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m benchmarks.lowering", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="sd15", help="tiny | sd15 | sd2")
  p.add_argument("--image-size", type=int, default=512)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--steps", type=int, default=50, help="DDIM steps of the sampler")
  p.add_argument("--programs", default=",".join(PROGRAMS), help="comma-separated subset")
  p.add_argument("--out", default=None, help="JSON results file")
  p.add_argument("--markdown", default=None, metavar="JSON", help="only print the table of an earlier --out file")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.markdown:
    with open(args.markdown) as f:
      report = json.load(f)
    print(markdown(report))
    return report
  settings = Settings(config=args.config, batch=args.batch, image_size=args.image_size, dtype=args.dtype,
                      steps=args.steps)
  start = time.perf_counter()
  rows = run(settings, tuple(args.programs.split(",")))
  report = dict(machine=machine_info(sys.argv[1:] if argv is None else argv, module="benchmarks.lowering"),
                settings=dataclasses.asdict(settings), seconds=time.perf_counter() - start, rows=rows)
  print(markdown(report))
  write_json(args.out, report)
  return report


if __name__ == "__main__":
  main()
