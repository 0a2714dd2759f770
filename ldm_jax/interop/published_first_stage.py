"""A frozen first stage read from a published checkpoint.

Accepted ``path``:

- a diffusers folder (its ``vae/``) or a diffusers ``vae`` folder itself;
- an original Stable Diffusion / LDM single file (``first_stage_model.*``
  keys; ``.safetensors``, or ``.ckpt`` through the safe loader), its
  architecture from its YAML (``config=``, ``<stem>.yaml`` beside it) or from
  the weights' shapes;
- the paper's first-stage checkpoints (kl-f4/f8/f16/f32, vq-f4/f8/f16: a
  ``model.ckpt`` with its ``config.yaml``), which need their YAML.

The latent scale factor comes with the checkpoint: the diffusers VAE's
``scaling_factor``, an LDM file's stored ``scale_factor`` (scale_by_std
models) or its YAML's, 0.18215 for SD files without a YAML, and 1.0 for
bare autoencoders (the paper's VQ LDMs use 1.0; a KL first stage of the
paper needs the value of the LDM trained on it, ``first_stage.scale_factor``).
"""

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from ldm_jax.assembly import FirstStageWeights
from ldm_jax.interop import ldm_config, naming
from ldm_jax.interop.diffusers_vae import diffusers_vae_to_original, first_stage_from_diffusers_config
from ldm_jax.interop.pretrained import SINGLE_FILE_SUFFIXES, first_stage_template, read_component
from ldm_jax.interop.weights import read_state_dict
from ldm_jax.models.first_stage import make_first_stage

SD_SCALE_FACTOR = 0.18215  # SD v1/v2's VAE (v1-inference.yaml's scale_factor)


def is_published_first_stage(path: str) -> bool:
  """Whether ``path`` looks like a checkpoint this module reads (not one of our run directories)."""
  if os.path.isdir(path):
    return _vae_folder(path) is not None
  return os.path.isfile(path) and path.endswith(SINGLE_FILE_SUFFIXES)


def load_published_first_stage(path: str, *, config: str | Mapping[str, Any] | None = None) -> FirstStageWeights:
  """The first stage in ``path`` (see module docstring), ready to freeze."""
  if os.path.isdir(path):
    folder = _vae_folder(path)
    if folder is None:
      raise FileNotFoundError(f"{path} is neither a run directory nor a diffusers folder (no vae/config.json)")
    return _from_diffusers(folder)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"first stage checkpoint {path!r} does not exist")
  if not path.endswith(SINGLE_FILE_SUFFIXES):
    raise ValueError(f"{path}: unknown first-stage format; expected a run directory, a diffusers folder or one of "
                     f"{SINGLE_FILE_SUFFIXES}")
  return _from_single_file(path, config)


def _vae_folder(path: str) -> str | None:
  for folder in (os.path.join(path, "vae"), path):
    cfg = os.path.join(folder, "config.json")
    if os.path.isfile(cfg):
      with open(cfg) as f:
        if json.load(f).get("_class_name") == "AutoencoderKL":
          return folder
  return None


def _from_diffusers(folder: str) -> FirstStageWeights:
  with open(os.path.join(folder, "config.json")) as f:
    cfg = json.load(f)
  section = first_stage_from_diffusers_config(cfg)
  state = diffusers_vae_to_original(read_component(folder), section, original_prefix="")
  return FirstStageWeights(_convert(section, state, "", folder), section,
                           float(cfg.get("scaling_factor", SD_SCALE_FACTOR)))


def _yaml_beside(path: str) -> str | None:
  """``<stem>.yaml``, or the ``config.yaml`` the paper's model zips put next to ``model.ckpt``."""
  for candidate in (os.path.splitext(path)[0] + ".yaml", os.path.join(os.path.dirname(path), "config.yaml")):
    if os.path.isfile(candidate):
      return candidate
  return None


def _from_single_file(path: str, config) -> FirstStageWeights:
  config = config if config is not None else _yaml_beside(path)
  if isinstance(config, str):
    config = ldm_config.read_yaml(config)
  state = read_state_dict(path)
  has_prefix = any(k.startswith(ldm_config.VAE_PREFIX) for k in state)
  scale = 1.0
  if config is not None and ldm_config.is_first_stage_config(config):
    section = ldm_config.first_stage_section(config["model"])
  elif config is not None:
    params = config["model"].get("params", {})
    section = ldm_config.first_stage_section(params["first_stage_config"])
    scale = float(params.get("scale_factor", 1.0))
  elif has_prefix:
    section, scale = ldm_config.vae_section_from_state_dict(state), SD_SCALE_FACTOR
  else:
    raise ValueError(f"{path} is a bare autoencoder checkpoint: its architecture is in its YAML config; put it "
                     "beside the file (config.yaml or <name>.yaml) or set first_stage.config")
  if "scale_factor" in state and np.size(state["scale_factor"]) == 1:  # scale_by_std LDMs store theirs
    scale = float(np.asarray(state["scale_factor"]))
  if not has_prefix and section["kind"] == "kl":
    logging.warning("%s: a bare KL autoencoder carries no latent scale factor; using 1.0 unless "
                    "first_stage.scale_factor is set (the LDM trained on it knows its value)", path)
  prefix = ldm_config.VAE_PREFIX if has_prefix else ""
  state = {k: v for k, v in state.items() if k.startswith(prefix)}
  return FirstStageWeights(_convert(section, state, prefix, path), section, scale)


def _convert(section: dict, state: Mapping[str, np.ndarray], prefix: str, what: str) -> dict:
  model = make_first_stage(section)
  return naming.torch_to_flax(state, first_stage_template(model), strip_prefix=prefix, ignore=(r"^loss\.",),
                              what=what)
