"""Flax variables as one flat file: an array per ``/``-joined path
(``params/encoder/conv_in/kernel``) in ``.safetensors`` or ``.npz``.

The format of a stage-2 run's first-stage copy and of every converted
network (Inception, LPIPS, judges): loading needs neither torch nor pickle.
"""

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

OUR_SUFFIXES = (".npz", ".safetensors")


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
  require_file(path, what, how_to_get)
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file

    flat = dict(load_file(path))
  elif path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as f:
      flat = {k: f[k] for k in f.files}
  else:
    raise ValueError(f"{path}: expected a converted {what} file ending in one of {OUR_SUFFIXES}")
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def require_file(path: str, what: str, how_to_get: str = "") -> None:
  if not os.path.isfile(path):
    hint = f" {how_to_get}" if how_to_get else ""
    raise FileNotFoundError(f"{what} file not found: {path}.{hint}")
