"""The floors of ``ldm_jax`` (CONTRIBUTING.md): imports go down, never up,
never round in a loop, and never hide inside a function to dodge one."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "ldm_jax"

# Lowest first. A module may import its own package, any package on a lower
# floor, and a package on its own floor as long as no loop forms.
FLOORS = (
    ("nn", "config"),
    ("models", "diffusion", "parallel", "data"),
    ("assembly", "pipeline", "evaluation", "training"),
    ("interop",),
    ("apps",),
)
FLOOR_OF = {name: level for level, names in enumerate(FLOORS) for name in names}


def _modules():
  for path in sorted(PACKAGE.rglob("*.py")):
    yield path, ast.parse(path.read_text(), filename=str(path))


def _package_of(path: pathlib.Path) -> str:
  relative = path.relative_to(PACKAGE)
  return relative.parts[0].removesuffix(".py") if relative.parts[0] != "__init__.py" else ""


def _imported_package(node: ast.AST) -> list[str]:
  """The ``ldm_jax`` sub-packages an import statement names."""
  if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
    names = [node.module]
    if node.module == "ldm_jax":  # `from ldm_jax import models`
      names = [f"ldm_jax.{a.name}" for a in node.names]
  elif isinstance(node, ast.Import):
    names = [a.name for a in node.names]
  else:
    return []
  return [n.split(".")[1] for n in names if n.startswith("ldm_jax.")]


def _project_imports():
  """``(path, line, own package, imported package, inside a function)`` of every project import."""
  for path, tree in _modules():
    own = _package_of(path)
    in_function = set()
    for fn in ast.walk(tree):
      if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        in_function.update(id(n) for n in ast.walk(fn) if n is not fn)
    for node in ast.walk(tree):
      for imported in _imported_package(node):
        yield path, node.lineno, own, imported, id(node) in in_function


def test_every_package_has_a_floor():
  packages = {_package_of(path) for path, _ in _modules()} - {""}
  assert packages <= set(FLOOR_OF), f"packages without a floor: {sorted(packages - set(FLOOR_OF))}"


def test_imports_go_down_the_floors():
  upward = [f"{p.relative_to(PACKAGE.parent)}:{line} {own} -> {imported}"
            for p, line, own, imported, _ in _project_imports()
            if own and imported != own and FLOOR_OF[imported] > FLOOR_OF[own]]
  assert not upward, "imports up the floors:\n" + "\n".join(upward)


def test_no_project_import_inside_a_function():
  hidden = [f"{p.relative_to(PACKAGE.parent)}:{line} imports ldm_jax.{imported}"
            for p, line, _, imported, inside in _project_imports() if inside]
  assert not hidden, "project imports written inside functions:\n" + "\n".join(hidden)


def test_no_two_packages_import_each_other():
  edges: dict[str, set[str]] = {}
  for _, _, own, imported, _ in _project_imports():
    if own and imported != own:
      edges.setdefault(own, set()).add(imported)

  def reaches(start: str, goal: str, seen: set[str]) -> bool:
    for nxt in edges.get(start, ()):
      if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
        return True
    return False

  loops = sorted(p for p in edges if reaches(p, p, {p}))
  assert not loops, f"packages on an import loop: {loops}"


@pytest.mark.parametrize("source, expected", [
    ("from ldm_jax.models.unet import UNetModel", ["models"]),
    ("import ldm_jax.nn.norm as norm", ["nn"]),
    ("from ldm_jax import models, pipeline", ["models", "pipeline"]),
    ("from flax import linen", []),
])
def test_the_import_reader_sees_each_form(source, expected):
  assert _imported_package(ast.parse(source).body[0]) == expected
