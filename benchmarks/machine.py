"""Where and with what a benchmark ran: CPU, accelerator, library versions, command line, load."""

import importlib.metadata
import os
import platform
import shlex
import subprocess
from typing import Any

import jax

PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "diffusers")


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def usable_cores() -> int:
  """Cores this process may run on (what XLA's CPU thread pool and torch should use)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def versions() -> dict[str, str | None]:
  found = {}
  for name in PACKAGES:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      found[name] = None
  return found


def git_revision() -> str | None:
  """``HEAD`` of the checkout, with ``+dirty`` when tracked files differ from it."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=root, capture_output=True).returncode != 0
  except (OSError, subprocess.CalledProcessError):
    return None
  return head.stdout.strip() + ("+dirty" if dirty else "")


def machine_info(argv: list[str], module: str = "benchmarks.run") -> dict[str, Any]:
  """The machine, the libraries and the command line (``argv``: the flags given to ``module``)."""
  device = jax.devices()[0]
  return dict(
      command=shlex.join(["python", "-m", module, *argv]),
      cpu=cpu_model(),
      cores=usable_cores(),
      load_average=os.getloadavg(),
      platform=device.platform,
      device_kind=device.device_kind,
      device_count=jax.device_count(),
      python=platform.python_version(),
      versions=versions(),
      git=git_revision(),
      xla_flags=os.environ.get("XLA_FLAGS", ""),
  )
