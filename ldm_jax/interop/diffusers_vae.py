"""diffusers ``AutoencoderKL`` <-> original LDM autoencoder state dicts and configs.

Same tensors, other names (``decoder.up_blocks.0`` is the original
``decoder.up.{N-1}``: diffusers counts decoder levels from the lowest
resolution), and one layout difference: the attention q/k/v/proj_out are
1x1 convs ``(C, C, 1, 1)`` in the original and Linear ``(C, C)`` in diffusers
(older diffusers files name them ``query/key/value/proj_attn``; both read).

    section = first_stage_from_diffusers_config(json.load(open("vae/config.json")))
    original = diffusers_vae_to_original(state_dict, section)
"""

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from ldm_jax.interop.diffusers_unet import _rename

# diffusers attention sub-module (new and legacy names) -> original name.
_ATTN_PARTS = {
    "group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
    "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out",
}
_RESNET_PARTS = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
                 ("conv_shortcut", "nin_shortcut"))
_ATTN_WEIGHT = re.compile(r"(^|\.)(attn_1|attn\.\d+)\.(q|k|v|proj_out)\.weight$")

# AutoencoderKL.__init__ defaults (what a config.json may leave out).
_DEFAULTS: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",), "block_out_channels": (64,), "layers_per_block": 1, "act_fn": "silu",
    "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32, "scaling_factor": 0.18215,
    "shift_factor": None, "latents_mean": None, "latents_std": None, "force_upcast": True, "use_quant_conv": True,
    "use_post_quant_conv": True, "mid_block_add_attention": True,
}


def first_stage_from_diffusers_config(config_json: Mapping[str, Any]) -> dict[str, Any]:
  """Our ``first_stage`` section (``{kind, embed_dim, ddconfig}``) for a diffusers VAE ``config.json``.

  Unsupported options are named together in one ValueError.
  """
  unknown = sorted(k for k in config_json if not k.startswith("_") and k not in _DEFAULTS)
  cfg = {**_DEFAULTS, **config_json}
  problems = [f"unknown option(s) {unknown}"] if unknown else []
  for key, ok in (("act_fn", cfg["act_fn"] == "silu"), ("shift_factor", cfg["shift_factor"] in (None, 0, 0.0)),
                  ("latents_mean", cfg["latents_mean"] is None), ("use_quant_conv", cfg["use_quant_conv"]),
                  ("use_post_quant_conv", cfg["use_post_quant_conv"])):
    if not ok:
      problems.append(f"{key}={cfg[key]!r}")
  channels = list(cfg["block_out_channels"])
  ch = channels[0]
  if any(c % ch for c in channels):
    problems.append(f"block_out_channels {channels} are not multiples of the first")
  down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
  if len(down) != len(channels) or len(up) != len(channels):
    problems.append(f"{len(channels)} block_out_channels but {len(down)} down / {len(up)} up block types")
  attends = []
  for kind in down:
    if kind not in ("DownEncoderBlock2D", "AttnDownEncoderBlock2D"):
      problems.append(f"down block type {kind!r}")
    attends.append(kind.startswith("Attn"))
  if [k.startswith("Attn") for k in reversed(up)] != attends or any(
      k not in ("UpDecoderBlock2D", "AttnUpDecoderBlock2D") for k in up):
    problems.append(f"up_block_types {up} must mirror down_block_types {down}")
  if problems:
    raise ValueError("Unsupported diffusers VAE config: " + "; ".join(problems))
  resolution = int(cfg["sample_size"] if isinstance(cfg["sample_size"], int) else cfg["sample_size"][0])
  z = cfg["latent_channels"]
  ddconfig = dict(
      double_z=True, z_channels=z, resolution=resolution, in_channels=cfg["in_channels"],
      out_ch=cfg["out_channels"], ch=ch, ch_mult=tuple(c // ch for c in channels),
      num_res_blocks=cfg["layers_per_block"],
      attn_resolutions=tuple(resolution // 2**i for i, a in enumerate(attends) if a), dropout=0.0,
      norm_num_groups=cfg["norm_num_groups"], use_mid_attn=bool(cfg["mid_block_add_attention"]),
  )
  return {"kind": "kl", "embed_dim": z, "ddconfig": ddconfig}


def diffusers_config_from_first_stage(section: Mapping[str, Any], scaling_factor: float) -> dict[str, Any]:
  """The diffusers ``AutoencoderKL`` config of our KL ``first_stage`` section (inverse of the above)."""
  dd = dict(section["ddconfig"])
  if section.get("kind", "kl") != "kl":
    raise ValueError(f"only KL autoencoders export to diffusers' AutoencoderKL, not {section.get('kind')!r}")
  z = dd.get("z_channels", 4)
  if section.get("embed_dim", z) != z:
    raise ValueError(f"diffusers' AutoencoderKL needs embed_dim == z_channels, got {section['embed_dim']} vs {z}")
  mult = tuple(dd.get("ch_mult", (1, 2, 4, 4)))
  res = dd.get("resolution", 256)
  attends = [res // 2**i in tuple(dd.get("attn_resolutions", ())) for i in range(len(mult))]
  ch = dd.get("ch", 128)
  return {
      "_class_name": "AutoencoderKL", "in_channels": dd.get("in_channels", 3), "out_channels": dd.get("out_ch", 3),
      "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attends],
      "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attends)],
      "block_out_channels": [ch * m for m in mult], "layers_per_block": dd.get("num_res_blocks", 2),
      "act_fn": "silu", "latent_channels": z, "norm_num_groups": dd.get("norm_num_groups", 32),
      "sample_size": res, "scaling_factor": float(scaling_factor),
      "mid_block_add_attention": bool(dd.get("use_mid_attn", True)),
  }


def _module_pairs(levels: int, num_res_blocks: int) -> list[tuple[str, str]]:
  """(diffusers module, original module) for every module of a VAE with ``levels`` levels."""
  # (VQ models, which share the trunk, also have a codebook.)
  pairs = [("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv"),
           ("quantize.embedding", "quantize.embedding")]
  for side in ("encoder", "decoder"):
    pairs += [(f"{side}.conv_in", f"{side}.conv_in"), (f"{side}.conv_out", f"{side}.conv_out"),
              (f"{side}.conv_norm_out", f"{side}.norm_out")]
    for j in (0, 1):
      pairs += [(f"{side}.mid_block.resnets.{j}.{d}", f"{side}.mid.block_{j + 1}.{o}") for d, o in _RESNET_PARTS]
    pairs += [(f"{side}.mid_block.attentions.0.{d}", f"{side}.mid.attn_1.{o}") for d, o in _ATTN_PARTS.items()]
  for i in range(levels):
    for j in range(num_res_blocks + 1):
      for side, d_level, o_level, blocks in (
          ("encoder", f"down_blocks.{i}", f"down.{i}", num_res_blocks),
          ("decoder", f"up_blocks.{i}", f"up.{levels - 1 - i}", num_res_blocks + 1),
      ):
        if j < blocks:
          pairs += [(f"{side}.{d_level}.resnets.{j}.{d}", f"{side}.{o_level}.block.{j}.{o}") for d, o in _RESNET_PARTS]
          pairs += [(f"{side}.{d_level}.attentions.{j}.{d}", f"{side}.{o_level}.attn.{j}.{o}")
                    for d, o in _ATTN_PARTS.items()]
    pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv"))
    pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{levels - 1 - i}.upsample.conv"))
  return pairs


def _shape_of(section: Mapping[str, Any]) -> tuple[int, int]:
  dd = section["ddconfig"]
  return len(tuple(dd.get("ch_mult", (1, 2, 4, 4)))), int(dd.get("num_res_blocks", 2))


def diffusers_vae_to_original(
    state_dict: Mapping[str, Any], section: Mapping[str, Any], *, original_prefix: str = ""
) -> dict[str, np.ndarray]:
  """Renames a diffusers VAE state dict to original names; attention weights become 1x1 convs."""
  renamed = _rename(state_dict, _module_pairs(*_shape_of(section)), what="diffusers VAE state dict")
  out = {}
  for key, value in renamed.items():
    value = np.asarray(value)
    if _ATTN_WEIGHT.search(key) and value.ndim == 2:
      value = value.reshape(*value.shape, 1, 1)
    out[original_prefix + key] = value
  return out


def original_vae_to_diffusers(
    state_dict: Mapping[str, Any], section: Mapping[str, Any], *, original_prefix: str = ""
) -> dict[str, np.ndarray]:
  """Renames an original VAE state dict (keys under ``original_prefix``) to diffusers names.

  Attention weights become Linear ``(C, C)``; the legacy diffusers names are
  never written.
  """
  legacy = {"query", "key", "value", "proj_attn"}
  pairs = [(o, d) for d, o in _module_pairs(*_shape_of(section)) if d.rsplit(".", 1)[-1] not in legacy]
  vae = {k[len(original_prefix):]: v for k, v in state_dict.items() if k.startswith(original_prefix)}
  out = {}
  for key, value in vae.items():
    value = np.asarray(value)
    if _ATTN_WEIGHT.search(key) and value.ndim == 4:
      value = value.reshape(value.shape[:2])
    out[key] = value
  return _rename(out, pairs, what="original VAE state dict")
