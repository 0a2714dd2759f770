"""Building a ``LatentDiffusion`` from config sections.

Sections (plain dicts or ConfigDicts, the reference's ``params`` names):

- ``unet``: ``UNetModel`` fields;
- ``cond_stage``: ``{kind, ...}`` (see ``ldm_jax.models.cond_stage``);
- ``concat``: ``{kind: none|low_res|inpaint|segmentation, num_seg_classes,
  low_res_size, latent_first (inpaint: the paper's channel order), rescaler: {SpatialRescaler fields}}``;
- ``first_stage``: ``{kind, embed_dim, [n_embed], ddconfig}``;
- ``ldm``: ``{use_label_emb, null_label}``.

The compute dtype (``precision.compute_dtype``) goes to every network;
parameters stay float32.
"""

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from ldm_jax.models.cond_stage import make_cond_stage
from ldm_jax.models.first_stage import make_first_stage
from ldm_jax.models.latent_diffusion import LatentDiffusion
from ldm_jax.models.unet import UNetModel


def _plain(section: Any) -> dict:
  if section is None:
    return {}
  return dict(section.to_dict() if hasattr(section, "to_dict") else section)


def build_unet(section: Mapping[str, Any], dtype: Any = jnp.float32, attention_impl: str | None = None) -> UNetModel:
  fields = _plain(section)
  fields.setdefault("dtype", dtype)
  if attention_impl is not None:
    fields.setdefault("attention_impl", attention_impl)
  for key in ("channel_mult", "attention_resolutions"):
    if key in fields:
      fields[key] = tuple(fields[key])
  if isinstance(fields.get("num_res_blocks"), list):
    fields["num_res_blocks"] = tuple(fields["num_res_blocks"])
  return UNetModel(**fields)


def build_latent_diffusion(
    *,
    unet: Mapping[str, Any],
    first_stage: Mapping[str, Any],
    cond_stage: Mapping[str, Any] | None = None,
    concat: Mapping[str, Any] | None = None,
    ldm: Mapping[str, Any] | None = None,
    scale_factor: float = 1.0,
    compute_dtype: str = "float32",
    attention_impl: str = "auto",
) -> LatentDiffusion:
  """The stage-2 model a config describes (weights are loaded elsewhere)."""
  dtype = jnp.dtype(compute_dtype)
  cond_cfg = _plain(cond_stage) or {"kind": "none"}
  if cond_cfg["kind"] != "none":
    cond_cfg.setdefault("dtype", str(dtype))
  concat_cfg = _plain(concat) or {"kind": "none"}
  concat_kind = concat_cfg.get("kind", "none")
  concat_stage = None
  if concat_kind in ("low_res", "segmentation"):
    concat_stage = make_cond_stage({"kind": "concat", **_plain(concat_cfg.get("rescaler"))})
  ldm_cfg = _plain(ldm)
  model = LatentDiffusion(
      unet=build_unet(unet, dtype, attention_impl),
      first_stage=make_first_stage(first_stage, dtype=dtype, attention_impl=attention_impl),
      cond_stage=make_cond_stage(cond_cfg),
      concat_kind=concat_kind,
      concat_stage=concat_stage,
      use_label_emb=bool(ldm_cfg.get("use_label_emb", False)),
      null_label=int(ldm_cfg.get("null_label", 0)),
      num_seg_classes=int(concat_cfg.get("num_seg_classes", 0)),
      low_res_size=int(concat_cfg.get("low_res_size", 0)),
      inpaint_latent_first=bool(concat_cfg.get("latent_first", False)),
      scale_factor=float(scale_factor),
  )
  return model
