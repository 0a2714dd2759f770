"""The one rename between PyTorch state dicts and our Flax parameter trees.

Our submodules are named after the reference state-dict keys with every run
of numeric components joined onto the preceding name (see CONTRIBUTING.md):
``input_blocks.1.1.proj_in.weight`` <-> ``input_blocks_1_1/proj_in/kernel``.
Leaves are converted by kind, decided by the Flax template:

- ``kernel`` of a conv: PyTorch ``(O, I, *K)`` <-> Flax ``(*K, I, O)``;
- ``kernel`` of a dense layer: ``(O, I)`` <-> ``(I, O)``; a 1x1 conv and a
  dense layer convert into each other (SD v1 vs v2 ``proj_in``, diffusers'
  linear VAE attention);
- ``scale`` of a norm <-> ``weight``; ``embedding`` <-> ``weight``;
- BatchNorm ``running_mean`` / ``running_var`` <-> ``batch_stats`` ``mean`` /
  ``var``; ``num_batches_tracked`` and ``position_ids`` buffers are dropped.

Loading checks every key at once: missing, unexpected and mis-shaped entries
are reported together in one :class:`StateDictMismatchError`, and nothing is
returned half-loaded.
"""

import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flax import traverse_util

# Reference module names that really contain "_<digits>": the autoencoders'
# mid block (``mid.block_1``, ``mid.attn_1``). Everywhere else name_3 stands
# for "name.3" (``down.0.block.1``).
LITERAL_UNDERSCORE_NAMES = {"mid": frozenset({"block_1", "block_2", "attn_1"})}
IGNORED_BUFFERS = ("num_batches_tracked", "position_ids")
_NUMBERED = re.compile(r"^(.*?)((?:_\d+)+)$")


class StateDictMismatchError(ValueError):
  """A state dict does not fit the model: names every problem at once."""

  def __init__(self, missing=(), unexpected=(), mismatched=(), what="checkpoint"):
    self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
    lines = [f"The {what} does not match the model:"]

    def section(title, items, fmt=str, limit=25):
      if items:
        lines.append(f"  {len(items)} {title}:")
        lines.extend(f"    {fmt(item)}" for item in items[:limit])
        if len(items) > limit:
          lines.append(f"    ... and {len(items) - limit} more")

    section("missing keys (in the model, not in the file)", self.missing)
    section("unexpected keys (in the file, not in the model)", self.unexpected)
    section(
        "shape mismatches",
        self.mismatched,
        lambda m: f"{m[0]}: file {tuple(m[1])} vs model {tuple(m[2])}",
    )
    super().__init__("\n".join(lines))


def torch_key_to_module_path(key: str) -> tuple[tuple[str, ...], str]:
  """``"a.b.1.2.c.weight"`` -> ``(("a", "b_1_2", "c"), "weight")``."""
  parts = key.split(".")
  path: list[str] = []
  for part in parts[:-1]:
    if part.isdigit() and path:
      path[-1] = f"{path[-1]}_{part}"
    else:
      path.append(part)
  return tuple(path), parts[-1]


def flax_name_to_torch(name: str, parent: str | None = None) -> str:
  """``"b_1_2"`` -> ``"b.1.2"``, leaving the reference's literal names alone."""
  if name in LITERAL_UNDERSCORE_NAMES.get(parent, ()):
    return name
  match = _NUMBERED.match(name)
  if not match or not match.group(1):
    return name
  return match.group(1) + match.group(2).replace("_", ".")


def _to_flax_kernel(w: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
  """Converts a PyTorch conv/linear weight to a Flax kernel of ``target_shape``."""
  if w.ndim == 2:  # Linear (O, I) -> (I, O), maybe into a 1x1 conv.
    return w.T.reshape(target_shape) if len(target_shape) > 2 and w.size == np.prod(target_shape) else w.T
  hwio = np.transpose(w, (*range(2, w.ndim), 1, 0))
  if len(target_shape) == 2 and all(d == 1 for d in hwio.shape[:-2]):
    return hwio.reshape(hwio.shape[-2:])  # 1x1 conv into a dense layer.
  return hwio


def _to_torch_weight(kernel: np.ndarray) -> np.ndarray:
  """Inverse of :func:`_to_flax_kernel` (keeps the Flax layer's own rank).

  Contiguous copies, not transposed views: safetensors writes views'
  memory as it lies, silently un-transposing them.
  """
  if kernel.ndim == 2:
    return np.ascontiguousarray(kernel.T)
  return np.ascontiguousarray(np.transpose(kernel, (kernel.ndim - 1, kernel.ndim - 2, *range(kernel.ndim - 2))))


def torch_to_flax(
    state_dict: Mapping[str, Any],
    template: Mapping[str, Any],
    *,
    strip_prefix: str = "",
    ignore: Iterable[str] = (),
    what: str = "checkpoint",
) -> dict[str, Any]:
  """Converts a PyTorch state dict into Flax variables shaped like ``template``.

  Args:
    state_dict: name -> array (NumPy, or anything ``np.asarray`` takes).
    template: Flax variables ``{"params": ..., ["batch_stats": ...]}`` (arrays
      or ``jax.ShapeDtypeStruct``s, e.g. from ``jax.eval_shape``).
    strip_prefix: prefix removed from every key first (``"first_stage_model."``);
      keys without it are ignored.
    ignore: regular expressions of keys to skip silently.
    what: how the error message names the file.

  Returns:
    Variables with the template's structure and dtypes, as NumPy arrays.
  """
  ignore_res = [re.compile(p) for p in ignore]
  wanted = {k: v for k, v in traverse_util.flatten_dict(template).items()}
  out: dict[tuple[str, ...], np.ndarray] = {}
  unexpected, mismatched, seen_bad_shape = [], [], set()
  for key, value in state_dict.items():
    if not key.startswith(strip_prefix):
      continue
    key = key[len(strip_prefix):]
    if any(r.search(key) for r in ignore_res):
      continue
    module, leaf = torch_key_to_module_path(key)
    if leaf in IGNORED_BUFFERS:
      continue
    target = _target_path(module, leaf, wanted)
    if target is None:
      unexpected.append(strip_prefix + key)
      continue
    w = np.asarray(value)
    target_shape = tuple(wanted[target].shape)
    if target[-1] == "kernel":
      w = _to_flax_kernel(w, target_shape)
    if tuple(w.shape) != target_shape:
      mismatched.append((strip_prefix + key, np.asarray(value).shape, target_shape))
      seen_bad_shape.add(target)
      continue
    out[target] = w.astype(wanted[target].dtype)
  missing = ["/".join(p) for p in wanted if p not in out and p not in seen_bad_shape]
  if missing or unexpected or mismatched:
    raise StateDictMismatchError(missing, unexpected, mismatched, what=what)
  return traverse_util.unflatten_dict(out)


def _target_path(module, leaf, wanted) -> tuple[str, ...] | None:
  """Finds the Flax variable a PyTorch ``module.leaf`` corresponds to."""
  if leaf == "running_mean":
    candidates = [("batch_stats", *module, "mean")]
  elif leaf == "running_var":
    candidates = [("batch_stats", *module, "var")]
  elif leaf == "weight":
    candidates = [("params", *module, n) for n in ("kernel", "scale", "embedding")]
  else:
    candidates = [("params", *module, leaf)]
  for c in candidates:
    if c in wanted:
      return c
  return None


def _torch_name(path: tuple[str, ...]) -> tuple[str, str]:
  """Flax variable path -> (PyTorch key without prefix, Flax leaf kind)."""
  collection, *module, leaf = path
  torch_module = ".".join(flax_name_to_torch(n, p) for p, n in zip((None, *module), module))
  if collection == "batch_stats":
    name = {"mean": "running_mean", "var": "running_var"}[leaf]
  elif leaf in ("kernel", "scale", "embedding"):
    name = "weight"
  else:
    name = leaf
  return f"{torch_module}.{name}", leaf


def torch_shapes(template: Mapping[str, Any], *, add_prefix: str = "") -> dict[str, tuple[int, ...]]:
  """The PyTorch key -> shape table that ``template`` corresponds to.

  Works on ``jax.eval_shape`` output, so full-size models can be checked
  against a reference key list without allocating them.
  """
  out = {}
  for path, value in traverse_util.flatten_dict(template).items():
    key, leaf = _torch_name(path)
    shape = tuple(value.shape)
    if leaf == "kernel":
      shape = shape[::-1] if len(shape) == 2 else (shape[-1], shape[-2], *shape[:-2])
    out[add_prefix + key] = shape
  return out


def flax_to_torch(variables: Mapping[str, Any], *, add_prefix: str = "") -> dict[str, np.ndarray]:
  """Converts Flax variables into a PyTorch-layout state dict (NumPy arrays).

  Kernels keep their rank: a Flax 1x1 conv becomes a 4-D PyTorch weight, a
  dense kernel a 2-D one. Callers targeting a layout that differs (diffusers'
  linear VAE attention) reshape afterwards.
  """
  out = {}
  for path, value in traverse_util.flatten_dict(variables).items():
    key, leaf = _torch_name(path)
    value = np.asarray(value)
    out[add_prefix + key] = _to_torch_weight(value) if leaf == "kernel" else value
  return out
