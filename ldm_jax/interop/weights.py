"""Reading published state dicts and saving/loading our converted variables.

Published evaluation networks come as PyTorch files (``.pth``) or safetensors.
Once converted, our Flax variables are stored flat, one array per
``/``-joined path (``params/Mixed_5b/branch1x1/conv/kernel``), as ``.npz`` or
``.safetensors``, so that loading needs neither torch nor pickle.
"""

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from ldm_jax.interop import naming

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
OUR_SUFFIXES = (".npz", ".safetensors")


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a PyTorch state dict from ``.safetensors`` or a torch file.

  Torch files are opened with ``torch.load(..., weights_only=True)``: no
  arbitrary unpickling. A checkpoint that nests its weights under
  ``"state_dict"`` is unwrapped.
  """
  _require_file(path, "state dict")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file

    return dict(load_file(path))
  if not path.endswith(TORCH_SUFFIXES):
    raise ValueError(f"{path}: unknown state dict format; expected .safetensors or one of {TORCH_SUFFIXES}")
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"Reading {path} needs PyTorch (pip install torch), or convert it to .safetensors first") from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
    state = state["state_dict"]
  # bfloat16 has no NumPy dtype: widen before leaving torch.
  return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()}


def save_variables(path: str, variables: Mapping[str, Any]) -> None:
  """Saves a nested dict of arrays as ``.npz`` or ``.safetensors``."""
  flat = {"/".join(k): np.ascontiguousarray(np.asarray(v)) for k, v in traverse_util.flatten_dict(variables).items()}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if path.endswith(".safetensors"):
    from safetensors.numpy import save_file

    save_file(flat, path)
  elif path.endswith(".npz"):
    np.savez(path, **flat)
  else:
    raise ValueError(f"{path}: output must end in one of {OUR_SUFFIXES}")


def load_variables(path: str, *, what: str = "weights", how_to_get: str = "") -> dict[str, Any]:
  """Loads what :func:`save_variables` wrote, as a nested dict of NumPy arrays.

  ``what`` and ``how_to_get`` only shape the error message of a missing file.
  """
  _require_file(path, what, how_to_get)
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file

    flat = dict(load_file(path))
  elif path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as f:
      flat = {k: f[k] for k in f.files}
  else:
    raise ValueError(f"{path}: expected a converted {what} file ending in one of {OUR_SUFFIXES}")
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def check_variables(variables: Mapping[str, Any], template: Mapping[str, Any], *, what: str) -> None:
  """Raises one error naming every missing, unexpected and mis-shaped entry of ``variables``."""
  got = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(variables).items()}
  want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(template).items()}
  missing = ["/".join(k) for k in want if k not in got]
  unexpected = ["/".join(k) for k in got if k not in want]
  mismatched = [("/".join(k), got[k], want[k]) for k in want if k in got and got[k] != want[k]]
  if missing or unexpected or mismatched:
    raise naming.StateDictMismatchError(missing, unexpected, mismatched, what=what)


def _require_file(path: str, what: str, how_to_get: str = "") -> None:
  if not os.path.isfile(path):
    hint = f" {how_to_get}" if how_to_get else ""
    raise FileNotFoundError(f"{what} file not found: {path}.{hint}")
