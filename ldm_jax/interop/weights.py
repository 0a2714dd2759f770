"""Reading published state dicts, and checking converted variables against a model.

Published networks come as PyTorch files or safetensors: :func:`read_state_dict`
is the one reader of them. Once converted, our Flax variables are stored flat
by ``ldm_jax.training.variables_file`` (``save_variables`` / ``load_variables``,
re-exported here), so that loading needs neither torch nor pickle.
"""

import glob
import os
import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from ldm_jax.interop import naming
from ldm_jax.training.variables_file import OUR_SUFFIXES, load_variables, require_file, save_variables

__all__ = ["OUR_SUFFIXES", "check_variables", "load_variables", "read_state_dict", "save_variables"]

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
STATE_DICT_SUFFIXES = (".safetensors", ".npz") + TORCH_SUFFIXES
StateDictSource = str | os.PathLike | Mapping[str, Any]


def read_state_dict(source: StateDictSource, *, prefer_prefix: str = "") -> dict[str, np.ndarray]:
  """A PyTorch-named state dict as NumPy arrays, bfloat16 widened to float32.

  ``source`` is a mapping (of arrays or torch tensors), a ``.safetensors``
  file, a folder of them, an ``.npz``, or a torch file (``.pth``, ``.pt``,
  ``.bin``, ``.ckpt``: ``torch.load(..., weights_only=True)``, no arbitrary
  unpickling; weights nested under ``"state_dict"`` are unwrapped). With
  ``prefer_prefix``, a state dict that has keys starting with it gives only
  those (from safetensors, only those are read).
  """
  if isinstance(source, Mapping):
    return _prefer(_arrays(source), prefer_prefix)
  path = os.fspath(source)
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
      raise FileNotFoundError(f"no .safetensors files in the state dict folder {path}")
  else:
    require_file(path, "state dict")
    if not path.endswith(STATE_DICT_SUFFIXES):
      raise ValueError(f"{path}: unknown state dict format; expected a folder of .safetensors or one of "
                       f"{STATE_DICT_SUFFIXES}")
    files = [path]
  out: dict[str, np.ndarray] = {}
  for file in files:
    if file.endswith(".safetensors"):
      out.update(_read_safetensors(file, prefer_prefix))
    elif file.endswith(".npz"):
      with np.load(file, allow_pickle=False) as f:
        out.update({k: _widen(f[k]) for k in f.files})
    else:
      out.update(_read_torch(file))
  return _prefer(out, prefer_prefix)


def _prefer(state: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  kept = {k: v for k, v in state.items() if k.startswith(prefix)} if prefix else {}
  return kept or state


def _widen(array: np.ndarray) -> np.ndarray:
  # safetensors gives bfloat16 as ml_dtypes.bfloat16, which NumPy cannot compute with.
  return array.astype(np.float32) if array.dtype.name == "bfloat16" else array


def _read_safetensors(file: str, prefer_prefix: str) -> dict[str, np.ndarray]:
  from safetensors import safe_open

  with safe_open(file, framework="numpy") as f:
    keys = list(f.keys())
    keys = [k for k in keys if prefer_prefix and k.startswith(prefer_prefix)] or keys
    return {k: _widen(f.get_tensor(k)) for k in keys}


class UnsafeCheckpointError(ValueError):
  """A torch file that cannot be read without executing code it contains."""


def _read_torch(file: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"Reading {file} needs PyTorch (pip install torch), or convert it to .safetensors first") from e
  try:
    state = torch.load(file, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    if "Unsupported operand" in str(e) or "invalid load key" in str(e):  # not a pickle at all: cut or not torch
      raise ValueError(f"{file} is not a readable PyTorch checkpoint (truncated, or another format)") from None
    # torch's own message suggests weights_only=False, which would run whatever code the file holds.
    raise UnsafeCheckpointError(
        f"{file} was refused: besides tensors it pickles Python objects that loading would have to execute "
        f"({str(e).splitlines()[-1].strip() or 'unsupported global'}). If you trust its source, convert it once "
        "in a sandbox: torch.load(path, weights_only=False), then safetensors.torch.save_file(state_dict, "
        "'model.safetensors'), and load the .safetensors file") from None
  if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
    state = state["state_dict"]
  return _arrays({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})


def _arrays(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Arrays or torch tensors as NumPy arrays (bfloat16 widened before leaving torch)."""
  out = {}
  for k, v in state.items():
    if hasattr(v, "detach"):  # a torch tensor
      v = v.detach().cpu()
      out[k] = (v.float() if str(v.dtype) == "torch.bfloat16" else v).numpy()
    else:
      out[k] = _widen(np.asarray(v))
  return out


def check_variables(variables: Mapping[str, Any], template: Mapping[str, Any], *, what: str) -> None:
  """Raises one error naming every missing, unexpected and mis-shaped entry of ``variables``."""
  got = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(variables).items()}
  want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(template).items()}
  missing = ["/".join(k) for k in want if k not in got]
  unexpected = ["/".join(k) for k in got if k not in want]
  mismatched = [("/".join(k), got[k], want[k]) for k in want if k in got and got[k] != want[k]]
  if missing or unexpected or mismatched:
    raise naming.StateDictMismatchError(missing, unexpected, mismatched, what=what)
