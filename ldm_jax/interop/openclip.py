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
``naming.torch_to_flax`` loads into ``ldm_jax.models.clip_text.CLIPTextModel``.
"""

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from ldm_jax.interop.naming import StateDictMismatchError

# OpenCLIP name -> transformers name, for the keys that only need renaming.
_RENAMES = (
    (r"^token_embedding\.weight$", "text_model.embeddings.token_embedding.weight"),
    (r"^positional_embedding$", "text_model.embeddings.position_embedding.weight"),
    (r"^ln_final\.(weight|bias)$", r"text_model.final_layer_norm.\1"),
    (r"^transformer\.resblocks\.(\d+)\.ln_1\.(weight|bias)$", r"text_model.encoder.layers.\1.layer_norm1.\2"),
    (r"^transformer\.resblocks\.(\d+)\.ln_2\.(weight|bias)$", r"text_model.encoder.layers.\1.layer_norm2.\2"),
    (r"^transformer\.resblocks\.(\d+)\.attn\.out_proj\.(weight|bias)$",
     r"text_model.encoder.layers.\1.self_attn.out_proj.\2"),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_fc\.(weight|bias)$", r"text_model.encoder.layers.\1.mlp.fc1.\2"),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_proj\.(weight|bias)$", r"text_model.encoder.layers.\1.mlp.fc2.\2"),
)
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
      for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0)):
        out[f"text_model.encoder.layers.{layer}.self_attn.{name}.{leaf}"] = part
      continue
    for pattern, replacement in _RENAMES:
      if re.match(pattern, key):
        out[re.sub(pattern, replacement, key)] = np.asarray(value)
        break
    else:
      unexpected.append(full_key)
  if unexpected:
    raise StateDictMismatchError(unexpected=unexpected, what="OpenCLIP text tower")
  if not out:
    raise ValueError(f"no OpenCLIP text-tower keys found under prefix {prefix!r}")
  return out
