"""Building a first stage (KL or VQ autoencoder, or the identity) from a config section.

The section mirrors the reference ``first_stage_config.params``:
``kind`` ("kl" | "vq" | "identity"), ``embed_dim``, ``n_embed`` (VQ), ``ddconfig``.

``identity`` is the pixel-space baseline of the paper's compression study
(LDM-1, Sec. 4.1): the "latent" is the image itself, f = 1, no parameters.
The reference expresses it as ``IdentityFirstStage``.
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.autoencoder import AutoencoderKL, DiagonalGaussian
from ldm_jax.models.vq import VQModel

FIRST_STAGE_KINDS = ("kl", "vq", "identity")
_AUTOENCODER_FIELDS = ("embed_dim", "n_embed", "beta", "legacy", "attention_impl")


class IdentityFirstStage(nn.Module):
  """Encode and decode are the identity: diffusion in pixel space (LDM-1).

  The latent is deterministic (like a VQ model's pre-quantisation latent),
  so training takes no posterior sample. No parameters: its variables are
  ``{}``. ``embed_dim`` is the image's channel count.
  """

  embed_dim: int = 3
  attention_impl: str = "auto"  # accepted (and unused) like the autoencoders' fields
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def downsample_factor(self) -> int:
    return 1

  @property
  def latent_channels(self) -> int:
    return self.embed_dim

  @property
  def ddconfig(self) -> dict:
    # What code sizing dummy inputs from an autoencoder's ddconfig reads.
    return {"in_channels": self.embed_dim, "z_channels": self.embed_dim}

  def _check(self, x: jax.Array, what: str) -> None:
    if x.ndim != 4 or x.shape[-1] != self.embed_dim:
      raise ValueError(f"the identity first stage takes (B, H, W, {self.embed_dim}) {what}, got {x.shape}")

  def encode(self, x_BxHxWxC: jax.Array, *, deterministic: bool = True) -> jax.Array:
    self._check(x_BxHxWxC, "images")
    return jnp.asarray(x_BxHxWxC)  # a jax.Array whatever came in, as the autoencoders' outputs are

  def decode(self, z_BxHxWxC: jax.Array, *, deterministic: bool = True) -> jax.Array:
    self._check(z_BxHxWxC, "latents")
    return jnp.asarray(z_BxHxWxC)

  def __call__(self, x_BxHxWxC: jax.Array, **_: Any) -> tuple[jax.Array, jax.Array]:
    """(reconstruction, latent), as the autoencoders return (reconstruction, posterior)."""
    z = self.encode(x_BxHxWxC)
    return self.decode(z), z


FirstStage = AutoencoderKL | VQModel | IdentityFirstStage


def make_first_stage(cfg: Mapping[str, Any], **overrides: Any) -> FirstStage:
  """``AutoencoderKL``, ``VQModel`` or ``IdentityFirstStage`` from ``{kind, embed_dim, [n_embed], ddconfig}``.

  ``identity`` needs only ``kind`` (and ``embed_dim``, default 3); the other
  keys a stage-2 base config carries (``ddconfig``, ``n_embed``) are ignored.
  """
  cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  kind = cfg.pop("kind", None)
  if kind == "identity":
    return _identity(cfg, overrides)
  if "ddconfig" not in cfg:
    raise ValueError(f"first-stage kind {kind!r} needs a ddconfig section (got keys {sorted(cfg)})")
  ddconfig = dict(cfg.pop("ddconfig"))
  fields = {k: v for k, v in cfg.items() if k in _AUTOENCODER_FIELDS}
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


def _identity(cfg: dict, overrides: dict) -> IdentityFirstStage:
  # A stage-2 base config's first_stage.model carries an autoencoder's keys: accepted, unused.
  unknown = sorted(set(cfg) - {*_AUTOENCODER_FIELDS, "ddconfig", "lossconfig"})
  if unknown:
    raise ValueError(f"unknown first-stage fields {unknown} for kind 'identity'; expected kind, embed_dim")
  embed_dim = int(cfg.get("embed_dim", 3))
  in_channels = dict(cfg.get("ddconfig") or {}).get("in_channels", embed_dim)
  if in_channels != embed_dim:
    raise ValueError(f"identity first stage: embed_dim {embed_dim} must equal the images' channels "
                     f"(ddconfig.in_channels {in_channels}): its latent is the image")
  fields = {k: v for k, v in overrides.items() if k in ("dtype", "param_dtype", "attention_impl")}
  for key in ("dtype", "param_dtype"):
    if isinstance(fields.get(key), str):
      fields[key] = jnp.dtype(fields[key])
  return IdentityFirstStage(embed_dim=embed_dim, **fields)


def encode_latents(
    model: FirstStage, variables: Any, x_BxHxWxC: jax.Array, rng: jax.Array | None = None
) -> jax.Array:
  """Images → the (unscaled) latent the LDM diffuses.

  KL: a posterior sample when ``rng`` is given (as the reference trains),
  else its mean. VQ: the pre-quantisation latent. Identity: the images.
  """
  out = model.apply(variables, x_BxHxWxC, method=model.encode)
  if isinstance(out, DiagonalGaussian):
    return out.sample(rng) if rng is not None else out.mean
  return out


def decode_latents(model: FirstStage, variables: Any, z_BxhxwxC: jax.Array) -> jax.Array:
  """(Unscaled) latents → images in about [-1, 1] (VQ quantises inside)."""
  return model.apply(variables, z_BxhxwxC, method=model.decode)
