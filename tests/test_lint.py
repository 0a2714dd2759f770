"""The ruff configuration in pyproject.toml holds for the whole repository, and no code uses a name
the installed jax has deprecated."""

import importlib
import pathlib
import re
import subprocess
import sys
import types

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
  command = [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", str(ROOT)]
  result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
  assert result.returncode == 0, result.stdout + result.stderr


def _deprecated_jax_names(source: str) -> set[str]:
  """The names in ``source`` that the installed jax lists as deprecated (``jax.X._deprecations``).

  jax warns about such a name once per process (its module ``__getattr__`` is
  cached), so a dependency that touches it first hides our use; this reads the
  code instead of waiting for the warning.
  """

  def deprecated(module_name: str, names: list[str]) -> set[str]:
    try:
      obj = importlib.import_module(module_name)
    except ImportError:
      return set()
    found = set()
    for i, name in enumerate(names):
      if not isinstance(obj, types.ModuleType):
        break
      if name in getattr(obj, "_deprecations", {}):
        found.add(".".join([module_name, *names[: i + 1]]))
        break
      try:
        obj = importlib.import_module(f"{obj.__name__}.{name}")
      except ImportError:
        obj = getattr(obj, name, None)
    return found

  found = set()
  for chain in re.findall(r"(?<![\w.])jax(?:\.\w+)+", source):
    found |= deprecated("jax", chain.split(".")[1:])
  for module, names in re.findall(r"^\s*from (jax(?:\.\w+)*) import \(?([\w ,\n]+)\)?", source, re.M):
    for name in re.findall(r"(\w+)(?: as \w+)?", names):
      found |= deprecated(module, [name])
  return found


def test_no_deprecated_jax_names():
  uses = {}
  paths = [
    *ROOT.glob("*.py"),
    *(p for folder in ("ldm_jax", "tests", "benchmarks") for p in (ROOT / folder).rglob("*.py")),
  ]
  for path in sorted(paths):
    names = _deprecated_jax_names(path.read_text())
    if names:
      uses[str(path.relative_to(ROOT))] = sorted(names)
  assert not uses, f"deprecated in the installed jax: {uses}"


def test_deprecated_jax_names_are_found():
  deprecations = getattr(jax, "_deprecations", {})
  if not deprecations:
    pytest.skip(f"jax {jax.__version__} lists no deprecated top-level name")
  name = next(iter(deprecations))
  assert _deprecated_jax_names(f"x = jax.{name}(y)\n") == {f"jax.{name}"}
