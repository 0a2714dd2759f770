"""Where a step's time goes, ours against PyTorch's, by kind of operation.

``python -m benchmarks.op_breakdown --config sd15 --image-size 256 --batch 1
--workloads unet_fwd,vae_decode,sampler_step --out FILE.json`` traces one call
of each of our compiled workloads with ``jax.profiler`` and one call of the
baseline's with ``torch.profiler``, and sums each side's operation times into
the same kinds: convolutions, attention (the QK/PV matmuls and their softmax),
dense matmuls (projections, feed-forward), norms and reductions, everything
else (elementwise, copies, layout). Both profilers time an operation on the
thread that runs it, so a kind's milliseconds are wall time spent in it;
what the kinds do not cover is dispatch and waiting between operations.

On XLA:CPU the kinds come from the compiled HLO: a thunk (one fusion or op)
counts as a convolution if its body holds a ``convolution``, as attention if
it holds a batched ``dot`` (or a softmax piece under an ``attn`` scope), as
dense if it holds an unbatched ``dot`` (a thunk holding several kinds counts
as the first of those). Eigen's convolutions (``XLA_FLAGS=
--xla_cpu_experimental_ynn_fusion_type=``) run after their thunk returns, so
in that mode their time is not attributed; compare wall times there.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax

from benchmarks.machine import machine_info, usable_cores
from benchmarks.report import provenance, write_json
from benchmarks.settings import WORKLOADS, Settings
from benchmarks.workloads import BUILDERS, Models

KINDS = ("conv", "attention", "dense", "norm_reduce", "other")

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%(\S+)\s+\(")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*\S+\s+([a-z][a-z0-9-]*)\((.*)$")
_CALLS = re.compile(r"calls=%([^\s,]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_NUMBERED = re.compile(r"[.]\d+$")  # fusion.12 -> fusion


def _body_kind(ops: list[tuple[str, str]]) -> str:
  """The kind of a computation from its ``(opcode, rest of line)`` pairs."""
  opcodes = {op for op, _ in ops}
  if "convolution" in opcodes:
    return "conv"
  dots = [rest for op, rest in ops if op == "dot"]
  if any("lhs_batch_dims" in rest for rest in dots):
    return "attention"
  if dots:
    return "dense"
  names = " ".join(m.group(1) for _, rest in ops for m in [_OP_NAME.search(rest)] if m)
  if re.search(r"/attn\d?/", names):
    return "attention"  # the softmax's max, exp and sum between the two batched dots
  if opcodes & {"reduce", "reduce-window"}:
    return "norm_reduce"
  return "other"


def hlo_thunk_kinds(text: str) -> dict[str, str]:
  """Instruction name -> kind for every instruction of a compiled HLO module's text.

  A fusion (or wrapped op) takes the kind of the computation it calls, so the
  names match the thunks a ``jax.profiler`` trace of XLA:CPU shows.
  """
  bodies: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
  callers: list[tuple[str, str, str]] = []  # (instruction, opcode, callee)
  current = None
  for line in text.splitlines():
    header = _COMPUTATION.match(line)
    if header and line.rstrip().endswith("{"):
      current = header.group(1)
      continue
    inst = _INSTRUCTION.match(line)
    if inst and current is not None:
      name, opcode, rest = inst.groups()
      bodies[current].append((opcode, rest))
      callee = _CALLS.search(rest)
      callers.append((name, opcode, callee.group(1) if callee else ""))
  kinds = {}
  for name, opcode, callee in callers:
    ops = bodies.get(callee) or [(opcode, "")]
    kinds[name] = _body_kind(ops)
  return kinds


def _trace_events(trace_dir: str) -> list[dict[str, Any]]:
  (path,) = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz"))
  with gzip.open(path) as f:
    return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def _summary(ms_by_kind: dict[str, float], wall_ms: float, top: collections.Counter) -> dict[str, Any]:
  covered = sum(ms_by_kind.values())
  return dict(wall_ms=wall_ms, ms_by_kind={k: ms_by_kind.get(k, 0.0) for k in KINDS},
              uncovered_ms=wall_ms - covered, top_ops=[[name, ms] for name, ms in top.most_common(8)])


def ours(fn: Callable[..., Any], args: tuple[Any, ...], warmup: int = 2) -> dict[str, Any]:
  """Compiles ``jax.jit(fn)`` for ``args``, runs it ``warmup`` times, traces one call."""
  executable = jax.jit(fn).lower(*args).compile()
  kinds = hlo_thunk_kinds(executable.as_text())
  for _ in range(warmup):
    jax.block_until_ready(executable(*args))
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      jax.block_until_ready(executable(*args))
    events = _trace_events(trace_dir)
  call = max((e for e in events if e["name"].startswith("ThunkExecutor::Execute")), key=lambda e: e["dur"])
  ms, top = collections.Counter(), collections.Counter()
  for e in events:
    kind = kinds.get(e["name"])
    if kind is not None:
      ms[kind] += e["dur"] / 1e3
      top[f"{kind}: {_NUMBERED.sub('', e['name'])}"] += e["dur"] / 1e3
  return _summary(ms, call["dur"] / 1e3, top)


_TORCH_KINDS = (
    ("conv", re.compile(r"conv|mkldnn_convolution")),
    ("attention", re.compile(r"scaled_dot_product|flash_attention|softmax|bmm|baddbmm")),
    ("dense", re.compile(r"addmm|aten::mm$|aten::linear|aten::matmul")),
    ("norm_reduce", re.compile(r"group_norm|layer_norm|aten::sum|aten::mean")),
)


def torch_kind(op: str) -> str:
  """The kind of a PyTorch (aten) operation name."""
  return next((kind for kind, pattern in _TORCH_KINDS if pattern.search(op)), "other")


def theirs(step: Callable[[], None], warmup: int = 2) -> dict[str, Any]:
  """Runs an eager PyTorch ``step`` ``warmup`` times, then profiles one call (self CPU time per op)."""
  from torch.profiler import ProfilerActivity, profile

  for _ in range(warmup):
    step()
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    start = time.perf_counter()
    step()
    wall_ms = (time.perf_counter() - start) * 1e3
  ms, top = collections.Counter(), collections.Counter()
  for avg in prof.key_averages():
    kind = torch_kind(avg.key)
    self_ms = avg.self_cpu_time_total / 1e3
    ms[kind] += self_ms
    top[f"{kind}: {avg.key}"] += self_ms
  return _summary(ms, wall_ms, top)


def _ms(value: float) -> str:
  return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def markdown(report: dict[str, Any]) -> str:
  """A results file as one Markdown table: per workload and kind, ours and torch's milliseconds."""
  lines = ["| workload | kind | ours ms | torch ms | ours/torch |", "|---|---|---|---|---|"]
  for name, sides in report["results"].items():
    a, b = sides["ours"], sides.get("torch")
    for kind in ("wall", *KINDS):
      pick = (lambda r: r["wall_ms"]) if kind == "wall" else (lambda r: r["ms_by_kind"][kind])  # noqa: E731
      x, y = pick(a), pick(b) if b else None
      ratio = f"{x / y:.2f}" if y else "-"
      label = f"**{kind}**" if kind == "wall" else kind
      lines.append(f"| {name} | {label} | {_ms(x)} | {'-' if y is None else _ms(y)} | {ratio} |")
  return "\n".join(lines + ["", provenance(report)])


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(prog="python -m benchmarks.op_breakdown", description=__doc__)
  p.add_argument("--config", default="tiny", help="tiny | sd15 | sd2")
  p.add_argument("--workloads", default="unet_fwd,vae_decode,sampler_step")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--image-size", type=int, default=64)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--baseline", default="torch", choices=("none", "torch"))
  p.add_argument("--out", default=None, help="JSON results file")
  p.add_argument("--markdown", default=None, metavar="FILE.json", help="only print a results file as Markdown")
  args = p.parse_args(argv)
  if args.markdown:
    with open(args.markdown) as f:
      report = json.load(f)
    print(markdown(report))
    return report
  names = args.workloads.split(",")
  if set(names) - set(WORKLOADS):
    p.error(f"unknown workloads {sorted(set(names) - set(WORKLOADS))}; choose from {WORKLOADS}")
  settings = Settings(config=args.config, batch=args.batch, image_size=args.image_size, steps=args.steps)
  machine = machine_info(sys.argv[1:] if argv is None else argv, "benchmarks.op_breakdown")  # the load at start
  models, results = Models(settings), {}
  for name in names:
    w = BUILDERS[name](models)
    results[name] = dict(ours=ours(w.fn, w.args))
  if args.baseline == "torch":
    import torch

    from benchmarks import torch_baseline as tb

    torch.set_num_threads(usable_cores())
    torch_models = tb.TorchModels(settings, "cpu")
    for name in names:
      results[name]["torch"] = theirs(tb.BUILDERS[name](torch_models).step)
  report = dict(machine=machine, settings=vars(args), results=results, load_average_end=os.getloadavg())
  print(markdown(report))
  write_json(args.out, report)
  return report


if __name__ == "__main__":
  main()
