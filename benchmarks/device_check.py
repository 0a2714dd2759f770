"""One prepared device check: ``python -m benchmarks.device_check`` (``benchmarks/device_check.sh`` installs first).

On a machine with one GPU, within ``--budget_s`` (8 minutes), it measures and
writes one JSON (``--out``) and one Markdown table (``--markdown``):

- the SD 1.5 UNet training step at 512 px, bf16 compute, float32 parameters and
  AdamW: MFU at batch 8 and 16, without and with remat (``--remat``);
- the 50-step guided DDIM sampler with the VAE decode at batch 8 (MFU), and one
  guided step at batch 1 (ms);
- cold and warm compile times (the warm one from the persistent cache), peak
  device memory (``device.memory_stats()``, a process-wide peak so far) and each
  program's own buffers (XLA's ``memory_analysis``);
- which attention XLA ran, read from the compiled HLO (cuDNN's fused attention
  custom call or XLA's dot + softmax), and the speed of each: the training step
  at batch 8 and the guided step at batch 1 again with ``attention_impl="xla"``;
- the same training step, sampler and guided step in PyTorch/diffusers on the same
  GPU, when torch and diffusers import (else those rows say why they were skipped).

MFU is model FLOPs over the step time over the chip's dense bf16 peak
(``benchmarks/peaks.py``). Model FLOPs are XLA's count of the same program
without remat and with XLA's attention, lowered from shapes (the sampler's other
loop trips added): the compiled program's own count (``xla_flops_per_step``)
includes remat's recomputation and misses the work inside cuDNN's custom call.
The PyTorch rows are credited with the same FLOPs (same architecture).

Rows run in the order of :func:`plan`, most important first; a row that would
not finish within the budget is skipped and one that fails records its error,
so a run always ends with a report (written after our rows and again at the
end). Our rows run in one child process and PyTorch's in another, so that
neither holds GPU memory the other needs; that one starts with ours, on the
CPU, to count FLOPs and import torch meanwhile. Without a GPU it stops at once
(exit code 3) with a message, unless ``--dry_run``: the same code on the CPU
with a two-level UNet (``micro``), batch 1-2, 2 sampler steps and the rows of
:data:`DRY_SKIPS` left out, in about a minute.
"""

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

NO_GPU_EXIT = 3
DEFAULT_BUDGET_S = 480.0
TORCH_RESERVE_S = 90.0  # of the budget, kept for the PyTorch rows when torch and diffusers are installed
GOALS = {"unet_train": ("mfu", 0.40), "sampler": ("mfu", 0.45), "sampler_step": ("ms", 15.0)}  # issue 8's
COMPILE_GOALS_S = {"cold": 60.0, "warm": 5.0}


@dataclasses.dataclass(frozen=True)
class Row:
  """One measurement: a workload of ``benchmarks/workloads.py`` (or ``torch_baseline.py``) at one setting."""

  name: str
  side: str  # "jax" | "torch"
  workload: str  # unet_train | sampler | sampler_step
  batch: int  # at full size; the dry run maps it through DRY_BATCH
  remat: str = "none"
  attention: str = "auto"


def plan(remat: str) -> tuple[Row, ...]:
  """Every row, ours first, most important first."""
  jax_rows = (
      Row("train_b8", "jax", "unet_train", 8),
      Row("sampler_b8", "jax", "sampler", 8),
      Row("step_b1", "jax", "sampler_step", 1),
      Row("train_b16", "jax", "unet_train", 16),
      Row(f"train_b16_{remat}", "jax", "unet_train", 16, remat=remat),
      Row(f"train_b8_{remat}", "jax", "unet_train", 8, remat=remat),
      Row("train_b8_xla_attention", "jax", "unet_train", 8, attention="xla"),
      Row("step_b1_xla_attention", "jax", "sampler_step", 1, attention="xla"),
  )
  torch_rows = tuple(Row(f"torch_{r.name}", "torch", r.workload, r.batch)
                     for r in jax_rows if r.remat == "none" and r.attention == "auto")
  return jax_rows + torch_rows


@dataclasses.dataclass(frozen=True)
class Shapes:
  """Full size (the GPU run) or the dry run's."""

  config: str
  image_size: int
  steps: int
  batch: Callable[[int], int]
  repeats: dict[str, tuple[int, int]]  # workload -> (timed, warm-up) calls
  dtype: str = "bfloat16"  # compute; parameters and optimiser state stay float32


FULL = Shapes("sd15", 512, 50, lambda b: b,
              {"unet_train": (10, 2), "sampler": (3, 1), "sampler_step": (20, 3)})
DRY_BATCH = {1: 1, 8: 1, 16: 2}
# Rows the dry run leaves out by default: each repeats, at other settings, code another dry row runs.
DRY_SKIPS = ("step_b1", "train_b16", "train_b16_{remat}", "train_b8_{remat}", "train_b8_xla_attention")
# XLA:CPU compiles at -O0 in the dry run (as the test suite does): the same programs, compiled in half the time.
DRY_XLA_FLAG = "--xla_backend_optimization_level=0"
# float32: XLA:CPU compiles the bfloat16 programs ~40% slower, and the code is the same.
DRY = Shapes("micro", 16, 2, DRY_BATCH.__getitem__,
             {"unet_train": (2, 1), "sampler": (2, 1), "sampler_step": (2, 1)}, "float32")


def settings_of(row: Row, shapes: Shapes):
  from benchmarks.settings import Settings

  return Settings(config=shapes.config, batch=shapes.batch(row.batch), image_size=shapes.image_size,
                  dtype=shapes.dtype, steps=shapes.steps, attention_impl=row.attention, remat_policy=row.remat)


# Every row of the JSON has these keys (None where they do not apply).
ROW_FIELDS = (
    "name", "side", "workload", "batch", "image_size", "steps", "remat", "attention_requested", "attention_ran",
    "custom_calls", "status", "error", "seconds", "compile_cold_s", "compile_warm_s", "warm_cache_hit",
    "median_ms", "images_per_s", "flops_per_step", "xla_flops_per_step", "mfu", "peak_device_bytes", "program_bytes",
    "goal", "goal_met", "compile_goals_met",
)


def blank_row(row: Row, shapes: Shapes, status: str, error: str | None = None) -> dict[str, Any]:
  out = dict.fromkeys(ROW_FIELDS)
  out.update(name=row.name, side=row.side, workload=row.workload, batch=shapes.batch(row.batch),
             image_size=shapes.image_size, steps=shapes.steps if row.workload == "sampler" else 1, remat=row.remat,
             attention_requested=row.attention, status=status, error=error)
  return out


def _error(e: BaseException) -> str:
  return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:400] if str(e).strip() else ''}"


class Deadline:
  """Starts a row only when the longest row so far would still end before ``at`` (epoch seconds)."""

  def __init__(self, at: float):
    self.at, self.longest = at, 0.0

  def allows(self) -> bool:
    return time.time() + self.longest < self.at

  def record(self, seconds: float) -> None:
    self.longest = max(self.longest, seconds)


def _write(path: str, part: dict[str, Any]) -> None:
  """Atomically, after every row: a child stopped at the time limit still leaves what it measured."""
  with open(path + ".tmp", "w") as f:
    json.dump(part, f, indent=1)
  os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------------- ours (child)
def run_jax(args: argparse.Namespace, rows: list[Row], shapes: Shapes) -> None:
  """Our rows, in order, on the GPU (the dry run: the CPU)."""
  import jax

  try:
    devices, init_error = jax.devices(), None
  except RuntimeError as e:
    devices, init_error = [], _error(e)
  if not args.dry_run and (not devices or devices[0].platform != "gpu"):
    why = f"; {init_error}" if init_error else ""
    print(f"device_check: jax {jax.__version__} sees no GPU (devices: {devices}{why}"
          "). Is the CUDA plugin installed (pip list | grep jax-cuda) and CUDA_VISIBLE_DEVICES unset? "
          "--dry_run runs the same code on the CPU.", file=sys.stderr)
    sys.exit(NO_GPU_EXIT)

  from benchmarks.compilation import enable_persistent_cache
  from benchmarks.machine import machine_info
  from benchmarks.measure import measure_workload
  from benchmarks.workloads import BUILDERS, Models

  enable_persistent_cache(args.cache_dir)
  part: dict[str, Any] = dict(machine=machine_info(args.argv, module="benchmarks.device_check"), rows=[])
  deadline = Deadline(args.deadline)
  base: Models | None = None  # parameters drawn once, copied for programs that donate them
  seen: set[str] = set()  # workloads already compiled warm once
  for row in rows:
    if not deadline.allows():
      part["rows"].append(blank_row(row, shapes, "skipped", "time budget: it would not have finished in time"))
      _write(args.part_out, part)
      continue
    print(f"[device_check] {row.name} ...", file=sys.stderr, flush=True)
    out, start, models, r = blank_row(row, shapes, "ok"), time.time(), None, None
    try:
      settings = settings_of(row, shapes)
      if base is None:
        base = Models(dataclasses.replace(settings, attention_impl="auto", remat_policy="none"))
      models = Models(settings)
      models.share_params(base, copy=row.workload == "unet_train")
      repeats, warmup = shapes.repeats[row.workload]
      # The warm (persistent cache) compile costs a second trace: once per workload is enough.
      r = measure_workload(BUILDERS[row.workload](models), repeats=repeats, warmup=warmup,
                           warm_compile=row.workload not in seen)
      seen.add(row.workload)
      memory = r["xla_memory_bytes"]
      out.update(
          attention_ran=r["attention_ran"], custom_calls=r["custom_calls"], compile_cold_s=r["compile_cold_s"],
          compile_warm_s=r["compile_warm_s"], warm_cache_hit=r["warm_cache_hit"], median_ms=1e3 * r["median_s"],
          images_per_s=r["images_per_s"], xla_flops_per_step=r["flops_per_step"],
          peak_device_bytes=r["peak_device_bytes"],
          program_bytes=memory and memory["argument"] + memory["output"] - memory["alias"] + memory["temp"],
      )
    except Exception as e:  # noqa: BLE001 - a failed row (out of memory, an unsupported kernel) is a finding
      out.update(status="error", error=_error(e))
      traceback.print_exc()
    models = r = None  # this row's parameters, optimiser state and executables go before the next row's
    gc.collect()
    jax.clear_caches()
    out["seconds"] = time.time() - start
    deadline.record(out["seconds"])
    part["rows"].append(out)
    _write(args.part_out, part)


# ---------------------------------------------------------------------------------------------- reference (child)
def flops_key(workload: str, batch: int) -> str:
  return f"{workload}/{batch}"


def count_model_flops(rows: list[Row], shapes: Shapes) -> dict[str, float | None]:
  """FLOPs per step of every (workload, batch) of ``rows``, without remat and with XLA's attention.

  XLA's count of a compiled program includes remat's recomputation and leaves
  out what a custom call (cuDNN's attention) does, so MFU is taken against
  this count of the plain program, lowered from shapes on the host CPU
  (nothing allocated or compiled; the same architecture for PyTorch's rows).
  """
  from benchmarks.measure import workload_flops
  from benchmarks.workloads import BUILDERS, Models

  counts: dict[str, float | None] = {}
  for row in rows:
    key = flops_key(row.workload, shapes.batch(row.batch))
    if key in counts:
      continue
    plain = dataclasses.replace(settings_of(row, shapes), remat_policy="none", attention_impl="xla")
    try:
      counts[key] = workload_flops(BUILDERS[row.workload](Models(plain, abstract=True)))
    except Exception as e:  # noqa: BLE001
      counts[key] = None
      print(f"device_check: no FLOP count for {key}: {_error(e)}", file=sys.stderr)
  return counts


def _skip_all(part: dict[str, Any], rows: list[Row], shapes: Shapes, reason: str) -> None:
  part.update(torch=dict(available=False, reason=reason), rows=[blank_row(r, shapes, "skipped", reason) for r in rows])


def run_reference(args: argparse.Namespace, rows: list[Row], shapes: Shapes) -> None:
  """Started with our rows and on the CPU: counts every row's model FLOPs, then, once ``--go_file``
  exists (our process has ended and freed the GPU), runs the PyTorch rows."""
  part: dict[str, Any] = dict(model_flops=count_model_flops(rows, shapes), torch=None, rows=[])
  _write(args.part_out, part)
  rows = [r for r in rows if r.side == "torch"]
  if not rows:
    return
  try:
    import torch

    from benchmarks import torch_baseline as tb
  except Exception as e:  # noqa: BLE001 - missing or broken: say which
    reason = f"torch and diffusers do not import: {_error(e)}"
    _skip_all(part, rows, shapes, reason)
    _write(args.part_out, part)
    return
  from benchmarks.machine import usable_cores
  from benchmarks.measure import measure_eager

  device = "cpu" if args.dry_run else "cuda"
  if device == "cuda" and not torch.cuda.is_available():
    reason = f"torch {torch.__version__} sees no CUDA device"
    _skip_all(part, rows, shapes, reason)
    _write(args.part_out, part)
    return
  while args.go_file and not os.path.exists(args.go_file):  # until our rows are done: the GPU is theirs
    time.sleep(0.2)
  torch.set_num_threads(usable_cores())
  torch.backends.cudnn.benchmark = True  # the fastest convolution algorithms, as a tuned PyTorch job would
  kind = torch.cuda.get_device_name() if device == "cuda" else "cpu"
  part["torch"] = dict(available=True, version=torch.__version__, device=kind,
                       diffusers=importlib.import_module("diffusers").__version__)
  deadline, models = Deadline(args.deadline), None
  for row in rows:
    if not deadline.allows():
      part["rows"].append(blank_row(row, shapes, "skipped", "time budget: it would not have finished in time"))
      _write(args.part_out, part)
      continue
    print(f"[device_check] {row.name} ...", file=sys.stderr, flush=True)
    out, start = blank_row(row, shapes, "ok"), time.time()
    try:
      settings = settings_of(row, shapes)
      if models is None:
        models = tb.TorchModels(settings, device)
      models.s = settings  # the modules do not depend on the batch; the inputs do
      tb.reset_peak_memory(device)
      w = tb.BUILDERS[row.workload](models)
      repeats, warmup = shapes.repeats[row.workload]
      r = measure_eager(row.name, w.step, w.images, repeats=repeats, warmup=warmup, flops_per_step=None, peak=None,
                        peak_memory=lambda: tb.peak_memory_bytes(device))
      out.update(attention_ran="torch sdpa", compile_cold_s=r["first_call_s"], median_ms=1e3 * r["median_s"],
                 images_per_s=r["images_per_s"], peak_device_bytes=r["peak_device_bytes"])
      del w
    except Exception as e:  # noqa: BLE001
      out.update(status="error", error=_error(e))
      traceback.print_exc()
    gc.collect()
    out["seconds"] = time.time() - start
    deadline.record(out["seconds"])
    part["rows"].append(out)
    _write(args.part_out, part)


# ---------------------------------------------------------------------------------------------- the parent
def _start_child(args: argparse.Namespace, part: str, deadline: float, out: str, env: dict[str, str],
                 go_file: str | None = None) -> subprocess.Popen:
  command = [sys.executable, "-m", "benchmarks.device_check", *args.argv, "--part", part, "--deadline",
             str(deadline), "--part_out", out, "--cache-dir", args.cache_dir]
  return subprocess.Popen(command + (["--go_file", go_file] if go_file else []), env=env)


def _wait(child: subprocess.Popen, part: str, deadline: float, grace_s: float) -> int:
  """The child's exit code; a row in flight at the deadline may finish, the limit only stops a hang."""
  limit = max(deadline - time.time(), 0.0) + grace_s
  try:
    return child.wait(timeout=limit)
  except subprocess.TimeoutExpired:
    child.kill()
    child.wait()
    print(f"device_check: the {part} process was stopped {limit:.0f} s before its end", file=sys.stderr)
    return -1


def _read(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return {}


def meets(row: dict[str, Any]) -> None:
  """Fills ``goal`` / ``goal_met`` (issue 8's targets) and ``compile_goals_met`` of a measured row."""
  kind, target = GOALS[row["workload"]]
  row["goal"] = f"MFU >= {100 * target:.0f}%" if kind == "mfu" else f"< {target:g} ms"
  if row["status"] == "ok":
    value = row["mfu"] if kind == "mfu" else row["median_ms"]
    row["goal_met"] = None if value is None else (value >= target if kind == "mfu" else value < target)
    if row["side"] == "jax":
      row["compile_goals_met"] = {
          name: None if row[f"compile_{name}_s"] is None else row[f"compile_{name}_s"] < limit
          for name, limit in COMPILE_GOALS_S.items()
      }


def credit_flops(rows: list[dict[str, Any]], model_flops: dict[str, float | None], device_kind: str | None) -> None:
  """Every measured row gets the model FLOPs of its workload and batch, and MFU against the chip's peak."""
  from benchmarks.peaks import mfu, peak_flops

  peak = peak_flops(device_kind) if device_kind and device_kind != "cpu" else None
  for r in rows:
    if r["status"] == "ok":
      r["flops_per_step"] = model_flops.get(flops_key(r["workload"], r["batch"]))
      r["mfu"] = mfu(r["flops_per_step"], r["median_ms"] / 1e3, peak)


def assemble(report: dict[str, Any], rows: list[Row], shapes: Shapes, ours: dict[str, Any], ref: dict[str, Any],
             code: int, start: float) -> dict[str, Any]:
  """The report from what the children wrote so far; rows they did not report are marked."""
  report = dict(report, notes=list(report["notes"]))
  if code != 0:
    report["notes"].append(f"our process ended with exit code {code}; the rows it did not report are marked")
  done = {r["name"]: r for part in (ours, ref) for r in part.get("rows", [])}
  out_rows = [dict(done.get(r.name) or blank_row(r, shapes, "not run", "its process stopped before this row"))
              for r in rows]
  machine, torch_info, model_flops = ours.get("machine", {}), ref.get("torch"), ref.get("model_flops", {})
  credit_flops(out_rows, model_flops, machine.get("device_kind") if machine.get("platform") != "cpu" else None)
  for r in out_rows:
    meets(r)
  if torch_info and not torch_info.get("available"):
    report["notes"].append(f"PyTorch rows skipped: {torch_info['reason']}")
  return dict(report, machine=machine, torch=torch_info, model_flops=model_flops, elapsed_s=time.time() - start,
              rows=out_rows)


def run_parent(args: argparse.Namespace, rows: list[Row], shapes: Shapes,
               write: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
  """Runs our rows, then PyTorch's; ``write``s the report after each (a stopped run keeps the first)."""
  start = time.time()
  budget_end = start + args.budget_s
  have_torch = all(importlib.util.find_spec(m) for m in ("torch", "diffusers"))
  jax_rows = [r for r in rows if r.side == "jax"]
  env = dict(os.environ)
  if args.dry_run:
    env["JAX_PLATFORMS"] = "cpu"
    if DRY_XLA_FLAG not in env.get("XLA_FLAGS", ""):
      env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {DRY_XLA_FLAG}".strip()
  else:
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")  # our process owns the GPU while it runs
  report: dict[str, Any] = dict(
      dry_run=args.dry_run, command=" ".join(["python -m benchmarks.device_check", *args.argv]),
      budget_s=args.budget_s, shapes=dict(config=shapes.config, image_size=shapes.image_size, steps=shapes.steps,
                                           dtype=shapes.dtype, repeats=shapes.repeats),
      goals=dict(GOALS, compile_s=COMPILE_GOALS_S), notes=[],
  )
  with tempfile.TemporaryDirectory(prefix="ldm_jax_device_check_") as scratch:
    paths = {part: os.path.join(scratch, f"{part}.json") for part in ("jax", "reference")}
    go_file = os.path.join(scratch, "go")
    # Started first, on the CPU (JAX_PLATFORMS=cpu: it must not claim the GPU): it counts FLOPs and imports
    # torch while our rows run, and touches the GPU only once our process has ended and `go_file` exists.
    reference = _start_child(args, "reference", budget_end, paths["reference"], dict(env, JAX_PLATFORMS="cpu"),
                             go_file)
    try:
      code = 0
      if jax_rows:
        jax_deadline = budget_end - (TORCH_RESERVE_S if (have_torch and len(jax_rows) < len(rows)
                                                         and not args.dry_run) else 0.0)
        code = _wait(_start_child(args, "jax", jax_deadline, paths["jax"], env), "jax", jax_deadline, args.grace_s)
        if code == NO_GPU_EXIT:
          sys.exit(NO_GPU_EXIT)  # the child said why
        write(assemble(report, rows, shapes, _read(paths["jax"]), _read(paths["reference"]), code, start))
      open(go_file, "w").close()
      _wait(reference, "reference", budget_end, args.grace_s)
    finally:
      if reference.poll() is None:
        reference.kill()
        reference.wait()
    report = assemble(report, rows, shapes, _read(paths["jax"]), _read(paths["reference"]), code, start)
  write(report)
  return report


# ---------------------------------------------------------------------------------------------- report
def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
  return "-" if value is None else format(value * scale, spec)


def markdown(report: dict[str, Any]) -> str:
  head = ["row", "side", "batch", "remat", "attention asked → ran", "cold s", "warm s", "median ms", "img/s",
          "TFLOP/step", "MFU %", "goal", "met", "peak GiB", "program GiB", "status"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in report["rows"]:
    ran = r["attention_ran"] or "-"
    met = {True: "yes", False: "**no**", None: "-"}[r["goal_met"]]
    status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['error']}".replace("|", "\\|")
    lines.append("| " + " | ".join([
        r["name"], r["side"], str(r["batch"]), r["remat"], f"{r['attention_requested']} → {ran}",
        _fmt(r["compile_cold_s"], ".1f"), _fmt(r["compile_warm_s"], ".1f"), _fmt(r["median_ms"], ".1f"),
        _fmt(r["images_per_s"], ".2f"), _fmt(r["flops_per_step"], ".2f", 1e-12), _fmt(r["mfu"], ".1f", 100),
        r["goal"] or "-", met, _fmt(r["peak_device_bytes"], ".1f", 2**-30), _fmt(r["program_bytes"], ".1f", 2**-30),
        status,
    ]) + " |")
  m, s = report["machine"], report["shapes"]
  torch_info = report["torch"] or {}
  lines += [
      "",
      f"{'DRY RUN (CPU, tiny shapes: the code path, not a measurement). ' if report['dry_run'] else ''}"
      f"{s['config']} at {s['image_size']}x{s['image_size']}, {s['dtype']} compute, {s['steps']} sampler steps; "
      f"`{report['command']}` — {m.get('device_kind', '?')} ({m.get('platform', '?')}), jax "
      f"{(m.get('versions') or {}).get('jax')}, git {m.get('git')}; torch "
      f"{torch_info.get('version', '-')} on {torch_info.get('device', '-')}, "
      f"diffusers {torch_info.get('diffusers', '-')}"
      f"; {report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget.",
      "cold: trace + lower + compile with an empty persistent cache (PyTorch: its first call); warm: after "
      "jax.clear_caches(), from the persistent cache (measured once per workload); peak: the process's peak so far; "
      "program: the program's own arguments + outputs + temporaries (XLA's memory_analysis).",
  ]
  lines += [f"Note: {n}" for n in report["notes"]]
  return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m benchmarks.device_check", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dry_run", "--dry-run", action="store_true", help="the same code on the CPU, tiny shapes")
  p.add_argument("--budget_s", type=float, default=None,
                 help=f"wall-clock budget of the whole check (default {DEFAULT_BUDGET_S:.0f}; dry run 600)")
  p.add_argument("--remat", default="save_dots", choices=("full", "save_dots"), help="the remat rows' policy")
  p.add_argument("--only", default=None, help="comma-separated row names (default: every row, see plan())")
  p.add_argument("--out", default=None, help="JSON (default benchmarks/results/device_check[_dry].json)")
  p.add_argument("--markdown", default=None, help="Markdown table (default: --out with .md)")
  p.add_argument("--cache-dir", default=None, help="persistent compilation cache (default: a fresh temporary one)")
  p.add_argument("--grace_s", type=float, default=60.0,
                 help="how long a row in flight may run past its process's deadline before it is stopped")
  # Between the parent and its children:
  p.add_argument("--part", choices=("jax", "reference"), default=None, help=argparse.SUPPRESS)
  p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
  p.add_argument("--part_out", default=None, help=argparse.SUPPRESS)
  p.add_argument("--go_file", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  raw = sys.argv[1:] if argv is None else list(argv)
  # What the user gave (the children get the same flags, then their own).
  args.argv = raw[: raw.index("--part")] if "--part" in raw else raw
  if "--cache-dir" in args.argv:  # the parent passes the resolved one
    i = args.argv.index("--cache-dir")
    args.argv = args.argv[:i] + args.argv[i + 2:]
  args.argv = [a for a in args.argv if not a.startswith("--cache-dir=")]
  if args.budget_s is None:
    args.budget_s = 600.0 if args.dry_run else DEFAULT_BUDGET_S
  return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
  args = parse_args(argv)
  shapes = DRY if args.dry_run else FULL
  rows = list(plan(args.remat))
  if args.dry_run and not args.only:
    rows = [r for r in rows if r.name not in {n.format(remat=args.remat) for n in DRY_SKIPS}]
  if args.only:
    wanted = args.only.split(",")
    unknown = sorted(set(wanted) - {r.name for r in rows})
    if unknown:
      raise SystemExit(f"device_check: unknown rows {unknown}; rows: {[r.name for r in rows]}")
    rows = [r for r in rows if r.name in wanted]
  if args.part:
    if args.part == "jax":
      run_jax(args, [r for r in rows if r.side == "jax"], shapes)
    else:
      run_reference(args, rows, shapes)
    return None
  out = args.out or f"benchmarks/results/device_check{'_dry' if args.dry_run else ''}.json"
  md_path = args.markdown or os.path.splitext(out)[0] + ".md"
  own_cache = args.cache_dir is None
  args.cache_dir = os.path.abspath(args.cache_dir or tempfile.mkdtemp(prefix="ldm_jax_device_check_cache_"))

  def write(report: dict[str, Any]) -> None:
    report["cache_dir"] = "(temporary, removed)" if own_cache else args.cache_dir
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      json.dump(report, f, indent=1)
      f.write("\n")
    with open(md_path, "w") as f:
      f.write(markdown(report) + "\n")

  try:
    report = run_parent(args, rows, shapes, write)
  finally:
    if own_cache:
      shutil.rmtree(args.cache_dir, ignore_errors=True)
  print(markdown(report))
  print(f"wrote {out} and {md_path}", file=sys.stderr)
  return report


if __name__ == "__main__":
  main()
