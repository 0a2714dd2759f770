"""Which first stage (and text encoder) made a folder of precomputed latents, and the check that a run uses it.

Latents from one autoencoder are noise to a UNet trained on another's latent
space, and nothing in the arrays says which one made them: the metadata
beside the shards records an identity (a digest of the weights, the model
config, the scale factor), and training refuses records whose identity is
not its own first stage's. Latents are stored *unscaled*, so the scale
factor is recorded but a different one is not an error: the model
multiplies by its own.
"""

import hashlib
import json
import logging
from typing import Any

import jax
import numpy as np

from ldm_jax.assembly import FirstStageWeights


def weights_digest(variables: Any) -> str:
  """sha256 of a pytree of arrays: every leaf's path, dtype, shape and bytes (host order)."""
  h = hashlib.sha256()
  leaves, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(variables))
  for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
    a = np.array(leaf, order="C", copy=None)
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _plain(value: Any) -> Any:
  """JSON's view of a config (tuples become lists), so a stored and a fresh one compare equal."""
  return json.loads(json.dumps(value, default=str))


def first_stage_identity(first_stage: FirstStageWeights, scale_factor: float, name: str = "") -> dict:
  """What the metadata records of the first stage that encoded the latents."""
  return {"name": name, "digest": weights_digest(first_stage.variables), "model": _plain(first_stage.model_config),
          "scale_factor": float(scale_factor)}


def encoder_identity(cond_stage_config: dict, variables: Any, name: str = "") -> dict:
  """What the metadata records of the frozen text encoder that made a stored ``context``."""
  return {"name": name, "digest": weights_digest(variables), "config": _plain(cond_stage_config)}


def _differs(stored: dict, now: dict) -> str | None:
  if stored["model"] != now["model"]:
    return "model config"
  if stored["digest"] != now["digest"]:
    return "weights"
  return None


def check_latent_records(metadata: dict, first_stage: FirstStageWeights, image_size: int, *,
                         first_stage_name: str = "the run's first stage", records: str = "the latents",
                         scale_factor: float | None = None, encoder: dict | None = None) -> None:
  """Refuses latents made by another first stage or at another image size, naming both.

  ``metadata`` is ``ldm_jax.data.latent_records.read_latent_metadata``'s;
  ``encoder`` (``encoder_identity``) is checked when the records hold a
  ``context``.
  """
  now = first_stage_identity(first_stage, first_stage.scale_factor if scale_factor is None else scale_factor,
                             first_stage_name)
  stored = metadata["first_stage"]
  what = _differs(stored, now)
  if what is not None:
    raise ValueError(
        f"{records} were encoded by first stage {stored.get('name') or '?'!r} (weights sha256 "
        f"{stored['digest'][:12]}) but this run's first stage is {first_stage_name!r} ({now['digest'][:12]}): "
        f"they differ in their {what}. Precompute the latents with this first stage "
        "(precompute_latents.py with the run's config), or set first_stage.checkpoint to the one that made them.")
  if metadata["image_size"] != image_size:
    raise ValueError(f"{records} were made from {metadata['image_size']}px images but data.image_size is "
                     f"{image_size}")
  if not np.isclose(stored["scale_factor"], now["scale_factor"], rtol=1e-6, atol=0.0):
    # Unscaled latents: the model's own factor applies; worth a line, not an error.
    logging.info("%s were made with scale factor %.6g; this run scales them by %.6g", records,
                 stored["scale_factor"], now["scale_factor"])
  if encoder is not None and metadata.get("context") is not None:
    made_by = metadata["context"]["encoder"]
    if made_by["config"] != encoder["config"] or made_by["digest"] != encoder["digest"]:
      raise ValueError(
          f"{records} hold the context of text encoder {made_by.get('name') or '?'!r} ({made_by['digest'][:12]}) "
          f"but this run's is {encoder.get('name') or '?'!r} ({encoder['digest'][:12]})")
