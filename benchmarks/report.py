"""The results table (stdout) and the JSON file."""

import json
import sys
from typing import Any

_COLUMNS = (
    ("workload", 12), ("side", 6), ("cold s", 8), ("warm s", 8), ("median ms", 10), ("img/s", 9),
    ("GFLOP/step", 11), ("TFLOP/s", 8), ("MFU", 6), ("peak MiB", 9), ("cpu/wall", 8), ("ours/ref", 8),
)


def _fmt(value: Any, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def _row(workload: str, side: str, r: dict[str, Any], ratio: float | None) -> list[str]:
  warm = r.get("compile_warm_s")
  warm_text = None if warm is None else f"{warm:.2f}" + ("" if r.get("warm_cache_hit") else "!")
  cold = r.get("compile_cold_s", r.get("first_call_s"))  # the baseline's first (eager) call
  flop_s, peak = r.get("flop_per_s"), r.get("peak_device_bytes")
  return [
      workload, side, _fmt(cold, ".2f"), warm_text or "-", _fmt(r["median_s"] * 1e3, ".1f"),
      _fmt(r["images_per_s"], ".2f"), _fmt(r["flops_per_step"] and r["flops_per_step"] / 1e9, ".2f"),
      _fmt(flop_s and flop_s / 1e12, ".3f"), _fmt(r.get("mfu") and 100 * r["mfu"], ".1f"),
      _fmt(peak and peak / 2**20, ".0f"), _fmt(r.get("cpu_over_wall"), ".2f"), _fmt(ratio, ".2f"),
  ]


def table(results: list[dict[str, Any]]) -> str:
  """One line per workload and side; ``ours/ref`` is our median step time over the baseline's."""
  lines = ["  ".join(name.rjust(width) for name, width in _COLUMNS)]
  for entry in results:
    rows = [_row(entry["workload"], "ours", entry["ours"], entry.get("ours_over_ref"))]
    if entry.get("ref"):
      rows.append(_row(entry["workload"], entry["ref_name"], entry["ref"], None))
    for cells in rows:
      lines.append("  ".join(cell.rjust(width) for cell, (_, width) in zip(cells, _COLUMNS)))
  lines.append("cold: trace+lower+compile (ours) or first eager call (ref); warm: after jax.clear_caches() "
               "from the persistent cache ('!' = the cache did not hit); MFU only where the chip's peak is known;\n"
               "cpu/wall: process CPU seconds over wall seconds of the timed calls (on CPU, far below the core "
               "count means the run was waiting for cores).")
  return "\n".join(lines)


def flops_table(rows: list[dict[str, Any]]) -> str:
  """GFLOP per step and per image, as counted from the lowered programs."""
  lines = [f"{'workload':>12}  {'GFLOP/step':>12}  {'GFLOP/image':>12}"]
  for row in rows:
    lines.append(f"{row['workload']:>12}  {_fmt(row['flops_per_step'] and row['flops_per_step'] / 1e9, '12.2f')}"
                 f"  {_fmt(row['flops_per_image'] and row['flops_per_image'] / 1e9, '12.2f')}")
  return "\n".join(lines)


def write_json(path: str | None, report: dict[str, Any]) -> None:
  """Writes ``report`` to ``path`` and says so on stderr; no ``path`` (an entry point's unset ``--out``): nothing."""
  if not path:
    return
  with open(path, "w") as f:
    json.dump(report, f, indent=1, sort_keys=False)
    f.write("\n")
  print(f"wrote {path}", file=sys.stderr)


def provenance(report: dict[str, Any]) -> str:
  """The command, machine, load and library versions behind a report, as one Markdown line."""
  m = report["machine"]
  load = f"load average at start {m['load_average'][0]:.2f}"
  if "load_average_end" in report:
    load += f", at end {report['load_average_end'][0]:.2f}"
  env = f"`XLA_FLAGS={m['xla_flags']}` " if m.get("xla_flags") else ""
  return (f"{env}`{m['command']}` — {m['cpu']}, {m['cores']} cores, {m['device_kind']}; {load}; git {m['git']}; "
          f"jax {m['versions']['jax']}, torch {m['versions']['torch']}, diffusers {m['versions']['diffusers']}.")


def markdown_flops(report: dict[str, Any]) -> str:
  """A ``--flops-only`` report as a Markdown table."""
  s = report["settings"]
  lines = [f"{s['config']}, {s['image_size']}x{s['image_size']}, batch {s['batch']}, {s['steps']} sampler steps:", "",
           "| workload | GFLOP/step | GFLOP/image |", "|---|---|---|"]
  for row in report["flops"]:
    lines.append(f"| {row['workload']} | {_fmt(row['flops_per_step'] and row['flops_per_step'] / 1e9, '.2f')} | "
                 f"{_fmt(row['flops_per_image'] and row['flops_per_image'] / 1e9, '.2f')} |")
  return "\n".join(lines + ["", provenance(report)])


def markdown(report: dict[str, Any]) -> str:
  """A results file as a Markdown table (``python -m benchmarks.report results.json``), for BENCHMARKS.md."""
  if "flops" in report:
    return markdown_flops(report)
  head = ["workload", "side", "cold compile / first call s", "warm compile s", "median ms", "img/s", "GFLOP/step",
          "TFLOP/s", "MFU %", "peak MiB", "cpu/wall", "ours/ref"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for entry in report["results"]:
    sides = [("ours", entry["ours"], entry.get("ours_over_ref"))]
    if entry.get("ref"):
      sides.append((entry["ref_name"], entry["ref"], None))
    for side, r, ratio in sides:
      lines.append("| " + " | ".join(_row(entry["workload"], side, r, ratio)) + " |")
  return "\n".join(lines + ["", provenance(report)])


if __name__ == "__main__":
  for path in sys.argv[1:]:
    with open(path) as f:
      print(markdown(json.load(f)), end="\n\n")
