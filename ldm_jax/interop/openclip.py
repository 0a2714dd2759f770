"""CLIP text-encoder key layouts -> the transformers ``CLIPTextModel`` keys we load.

Two layouts need more than the generic rename in ``naming``:

- transformers 5 saves ``CLIPTextModel`` without the ``text_model.`` level
  that diffusers' ``text_encoder`` folders and original SD v1 checkpoints
  have (``CLIPTextModelWithProjection`` keeps it): :func:`add_text_model_prefix`.
- OpenCLIP, below.

Original SD 2.x single-file checkpoints store the text encoder the way
OpenCLIP names it, under ``cond_stage_model.model.``: one fused
``attn.in_proj_weight`` (3D x D, rows q, k, v) per block, a
``positional_embedding`` parameter and ``text_projection`` as a (D, P) matrix
used as ``x @ P``. After :func:`openclip_text_to_transformers` the keys are
those of transformers' ``CLIPTextModelWithProjection``, which
``naming.torch_to_flax`` loads into ``ldm_jax.models.clip_text.CLIPTextModel``;
:func:`transformers_text_to_openclip` goes back (SD 2.x single-file export).
"""

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from ldm_jax.interop.naming import StateDictMismatchError

# OpenCLIP name <-> transformers name, for the keys that only need renaming ({i}: a layer, {p}: weight or bias).
_NAME_PAIRS = (
    ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
    ("ln_final.{p}", "text_model.final_layer_norm.{p}"),
    ("transformer.resblocks.{i}.ln_1.{p}", "text_model.encoder.layers.{i}.layer_norm1.{p}"),
    ("transformer.resblocks.{i}.ln_2.{p}", "text_model.encoder.layers.{i}.layer_norm2.{p}"),
    ("transformer.resblocks.{i}.attn.out_proj.{p}", "text_model.encoder.layers.{i}.self_attn.out_proj.{p}"),
    ("transformer.resblocks.{i}.mlp.c_fc.{p}", "text_model.encoder.layers.{i}.mlp.fc1.{p}"),
    ("transformer.resblocks.{i}.mlp.c_proj.{p}", "text_model.encoder.layers.{i}.mlp.fc2.{p}"),
)
_QKV = ("q_proj", "k_proj", "v_proj")
_SPLIT_QKV = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj)\.(weight|bias)$")


def _template(name: str) -> re.Pattern:
  pattern = re.escape(name).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
  return re.compile(f"^{pattern}$")


_OPENCLIP_TO_TRANSFORMERS = tuple((_template(a), b) for a, b in _NAME_PAIRS)
_TRANSFORMERS_TO_OPENCLIP = tuple((_template(b), a) for a, b in _NAME_PAIRS)


def _rename(key: str, table: tuple[tuple[re.Pattern, str], ...]) -> str | None:
  for pattern, target in table:
    if m := pattern.match(key):
      return target.format(**m.groupdict())
  return None


_FUSED_QKV = re.compile(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
# Parts of an OpenCLIP model that are not the text tower's weights.
_SKIPPED = re.compile(r"^(visual\.|logit_scale$|logit_bias$|attn_mask$)")


_TEXT_MODEL_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")


def add_text_model_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Puts transformers 5's flat ``CLIPTextModel`` keys under ``text_model.``; other keys stay."""
  return {
      (f"text_model.{k}" if k.startswith(_TEXT_MODEL_PARTS) else k): v for k, v in state_dict.items()
  }


def openclip_text_to_transformers(
    state_dict: Mapping[str, Any],
    *,
    prefix: str = "cond_stage_model.model.",
    include_projection: bool = True,
) -> dict[str, np.ndarray]:
  """Renames an OpenCLIP text tower into transformers ``CLIPTextModel(WithProjection)`` keys.

  Args:
    state_dict: a checkpoint's state dict (NumPy or anything ``np.asarray``
      takes); keys without ``prefix`` are ignored.
    prefix: where the OpenCLIP model sits (``""`` for a bare OpenCLIP state dict).
    include_projection: keep ``text_projection`` (as ``text_projection.weight``,
      transposed to a Linear weight); drop it for a model without projection.

  Returns:
    transformers-named arrays, without prefix. Keys under ``prefix`` that are
    neither text-tower weights nor known non-text entries (``visual.*``,
    ``logit_scale``) raise a :class:`StateDictMismatchError` naming them.
  """
  out: dict[str, np.ndarray] = {}
  unexpected = []
  for full_key, value in state_dict.items():
    if not full_key.startswith(prefix):
      continue
    key = full_key[len(prefix):]
    if _SKIPPED.search(key):
      continue
    if key == "text_projection":
      if include_projection:
        out["text_projection.weight"] = np.asarray(value).T
      continue
    fused = _FUSED_QKV.match(key)
    if fused:
      layer, leaf = fused.groups()
      value = np.asarray(value)
      if value.shape[0] % 3:
        raise ValueError(f"{full_key}: first dimension {value.shape[0]} is not 3 x width (q, k, v)")
      for name, part in zip(_QKV, np.split(value, 3, axis=0)):
        out[f"text_model.encoder.layers.{layer}.self_attn.{name}.{leaf}"] = part
      continue
    renamed = _rename(key, _OPENCLIP_TO_TRANSFORMERS)
    if renamed is None:
      unexpected.append(full_key)
    else:
      out[renamed] = np.asarray(value)
  if unexpected:
    raise StateDictMismatchError(unexpected=unexpected, what="OpenCLIP text tower")
  if not out:
    raise ValueError(f"no OpenCLIP text-tower keys found under prefix {prefix!r}")
  return out


def transformers_text_to_openclip(
    state_dict: Mapping[str, Any], *, prefix: str = "cond_stage_model.model."
) -> dict[str, np.ndarray]:
  """The inverse of :func:`openclip_text_to_transformers`: transformers ``CLIPTextModel(WithProjection)``
  keys (with ``text_model.``) to OpenCLIP's under ``prefix``, q/k/v fused into ``attn.in_proj_*``."""
  out: dict[str, np.ndarray] = {}
  qkv: dict[tuple[str, str], dict[str, np.ndarray]] = {}
  unexpected = []
  for key, value in state_dict.items():
    value = np.asarray(value)
    if key == "text_projection.weight":
      out[prefix + "text_projection"] = value.T
    elif split := _SPLIT_QKV.match(key):
      layer, name, leaf = split.groups()
      qkv.setdefault((layer, leaf), {})[name] = value
    elif (renamed := _rename(key, _TRANSFORMERS_TO_OPENCLIP)) is not None:
      out[prefix + renamed] = value
    else:
      unexpected.append(key)
  if unexpected:
    raise StateDictMismatchError(unexpected=unexpected, what="CLIP text model (to OpenCLIP)")
  for (layer, leaf), parts in qkv.items():
    missing = [f"text_model.encoder.layers.{layer}.self_attn.{n}.{leaf}" for n in _QKV if n not in parts]
    if missing:
      raise StateDictMismatchError(missing=missing, what="CLIP text model (to OpenCLIP)")
    out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{leaf}"] = np.concatenate([parts[n] for n in _QKV])
  return out
