"""Building a first-stage autoencoder (KL or VQ) from a config section.

The section mirrors the reference ``first_stage_config.params``:
``kind`` ("kl" | "vq"), ``embed_dim``, ``n_embed`` (VQ), ``ddconfig``.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from ldm_jax.models.autoencoder import AutoencoderKL, DiagonalGaussian
from ldm_jax.models.vq import VQModel

FIRST_STAGE_KINDS = ("kl", "vq")


def make_first_stage(cfg: Mapping[str, Any], **overrides: Any) -> AutoencoderKL | VQModel:
  """``AutoencoderKL`` or ``VQModel`` from ``{kind, embed_dim, [n_embed], ddconfig}``."""
  cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  kind = cfg.pop("kind", None)
  ddconfig = dict(cfg.pop("ddconfig"))
  fields = {k: v for k, v in cfg.items() if k in ("embed_dim", "n_embed", "beta", "legacy", "attention_impl")}
  unknown = sorted(set(cfg) - set(fields) - {"lossconfig"})
  if unknown:
    raise ValueError(f"unknown first-stage fields {unknown}; expected kind, embed_dim, n_embed, ddconfig")
  fields.update(overrides)
  for key in ("dtype", "param_dtype"):
    if isinstance(fields.get(key), str):
      fields[key] = jnp.dtype(fields[key])
  if kind == "kl":
    fields.pop("n_embed", None)
    return AutoencoderKL(ddconfig=ddconfig, **fields)
  if kind == "vq":
    return VQModel(ddconfig=ddconfig, **fields)
  raise ValueError(f"first-stage kind must be one of {FIRST_STAGE_KINDS}, got {kind!r}")


def encode_latents(
    model: AutoencoderKL | VQModel, variables: Any, x_BxHxWxC: jax.Array, rng: jax.Array | None = None
) -> jax.Array:
  """Images → the (unscaled) latent the LDM diffuses.

  KL: a posterior sample when ``rng`` is given (as the reference trains),
  else its mean. VQ: the pre-quantisation latent.
  """
  out = model.apply(variables, x_BxHxWxC, method=model.encode)
  if isinstance(out, DiagonalGaussian):
    return out.sample(rng) if rng is not None else out.mean
  return out


def decode_latents(model: AutoencoderKL | VQModel, variables: Any, z_BxhxwxC: jax.Array) -> jax.Array:
  """(Unscaled) latents → images in about [-1, 1] (VQ quantises inside)."""
  return model.apply(variables, z_BxhxwxC, method=model.decode)
