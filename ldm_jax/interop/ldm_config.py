"""Model sections for original-format checkpoints: from a reference YAML, or from the weights' shapes.

A reference config (``v1-inference.yaml``, ``cin256-v2.yaml``, ...) has
``model.params.{unet_config, first_stage_config, cond_stage_config}`` whose
``params`` are our module fields (see CONTRIBUTING.md), plus the schedule
(``linear_start``, ``linear_end``, ``timesteps``), ``parameterization``
(``eps`` / ``x0`` / ``v``), ``scale_factor`` and ``conditioning_key``.
:func:`sections_from_ldm_config` turns it into the keyword arguments of
``build_latent_diffusion``.

Without a config, :func:`sd_sections_from_state_dict` reads a Stable
Diffusion checkpoint's architecture off its tensor shapes. Two things are not
in the shapes and follow SD's published configs: the attention heads (context
dim 768: 8 heads, SD v1; 1024: 64 channels per head, SD v2) and the
prediction type (eps; SD 2.x 768-v models need ``parameterization: v`` from
their ``v2-inference-v.yaml`` or ``prediction_type="v"``).
"""

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from ldm_jax.interop.naming import StateDictMismatchError
from ldm_jax.models.unet import UNetModel

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
COND_PREFIX = "cond_stage_model."
# Reference-only UNet options (memory / precision switches of the PyTorch code).
_UNET_IGNORED = ("use_checkpoint", "use_fp16", "use_bf16")
_CLIP_TARGETS = {"FrozenCLIPEmbedder": "sd_v1", "FrozenOpenCLIPEmbedder": "sd_v2"}
_CLIP_REFERENCE_ONLY = ("version", "device", "max_length", "freeze", "arch", "layer", "layer_idx")


def read_yaml(path: str) -> dict[str, Any]:
  try:
    import yaml
  except ImportError as e:
    raise ImportError(f"reading {path} needs PyYAML (pip install pyyaml), or pass the config as a dict") from e
  with open(path) as f:
    return yaml.safe_load(f)


def _cls(target: str) -> str:
  return str(target).rsplit(".", 1)[-1]


def first_stage_section(first_stage_config: Mapping[str, Any]) -> dict[str, Any]:
  """``{kind, embed_dim, [n_embed], ddconfig}`` of a reference ``first_stage_config`` (or ``model``)."""
  cls = _cls(first_stage_config.get("target", ""))
  params = dict(first_stage_config.get("params", {}))
  params.pop("lossconfig", None)
  params.pop("ckpt_path", None)
  kinds = {"AutoencoderKL": "kl", "VQModel": "vq", "VQModelInterface": "vq"}
  if cls not in kinds:
    raise ValueError(f"unsupported first stage {first_stage_config.get('target')!r}; expected one of {sorted(kinds)}")
  section = {"kind": kinds[cls], "embed_dim": params["embed_dim"], "ddconfig": dict(params["ddconfig"])}
  if "n_embed" in params:
    section["n_embed"] = params["n_embed"]
  return section


def is_first_stage_config(config: Mapping[str, Any]) -> bool:
  return _cls(config["model"].get("target", "")) in ("AutoencoderKL", "VQModel", "VQModelInterface")


def sections_from_ldm_config(config: Mapping[str, Any]) -> dict[str, Any]:
  """``build_latent_diffusion`` keyword arguments plus ``schedule``, ``prediction_type``, ``image_size``."""
  model = config["model"]
  params = dict(model.get("params", {}))
  problems = []
  unet = dict(params["unet_config"]["params"])
  for key in _UNET_IGNORED:
    unet.pop(key, None)

  valid = set(UNetModel.__dataclass_fields__) - {"parent", "name"}
  problems += [f"unet_config option {k!r}" for k in sorted(set(unet) - valid)]
  first_stage = first_stage_section(params["first_stage_config"])
  cond_cfg = params.get("cond_stage_config", "__is_unconditional__")
  key = params.get("conditioning_key")
  if key is None and cond_cfg != "__is_unconditional__":
    key = "concat" if params.get("concat_mode", True) else "crossattn"  # the reference's default
  cond, concat, ldm = {"kind": "none"}, None, {}
  if key == "concat" and cond_cfg == "__is_first_stage__":
    # The paper's inpainting LDM: the first stage encodes the masked image (not rescaled:
    # its VQ models have scale_factor 1) and the mask follows it.
    concat = {"kind": "inpaint", "latent_first": True}
  elif cond_cfg != "__is_unconditional__":
    cls = _cls(cond_cfg.get("target", "") if isinstance(cond_cfg, Mapping) else cond_cfg)
    cparams = dict(cond_cfg.get("params") or {}) if isinstance(cond_cfg, Mapping) else {}
    if key == "concat" and cls == "SpatialRescaler":  # semantic synthesis: one-hot maps, resized and mapped
      rescaler = {k: cparams[k] for k in ("n_stages", "method", "multiplier", "in_channels", "out_channels", "bias")
                  if k in cparams}
      concat = {"kind": "segmentation", "num_seg_classes": int(cparams.get("in_channels", 3)), "rescaler": rescaler}
    elif key == "concat" and cls == "Identity":  # super-resolution: the low-res image at latent size
      concat = {"kind": "low_res", "low_res_size": int(params.get("image_size", unet.get("image_size", 64))),
                "rescaler": {"n_stages": 0}}
    elif cls == "ClassEmbedder":
      cond = {"kind": "class", **{k: v for k, v in cparams.items() if k in ("embed_dim", "n_classes", "key")}}
    elif cls == "BERTEmbedder":
      cond = {"kind": "text", **cparams}
      cond.pop("device", None)
    elif cls in _CLIP_TARGETS:
      cond = {"kind": "clip", "preset": _CLIP_TARGETS[cls]}
      if cparams.get("layer") in ("penultimate", "last"):
        cond["output_layer"] = cparams["layer"]
      cond.update({k: v for k, v in cparams.items() if k not in _CLIP_REFERENCE_ONLY})
    else:
      problems.append(f"cond_stage_config target {cls!r}")
  if "Inpaint" in _cls(model.get("target", "")):
    concat = {"kind": "inpaint"}  # SD inpainting: z_t + mask + latent of the masked image
  elif key == "adm":
    ldm = {"use_label_emb": True}
  elif key not in (None, "crossattn") and not (key == "concat" and concat is not None):
    problems.append(f"conditioning_key {key!r} with model {model.get('target')!r}")
  if problems:
    raise ValueError("unsupported reference config: " + "; ".join(problems))
  factor = 2 ** (len(first_stage["ddconfig"].get("ch_mult", (1, 2, 4, 4))) - 1)
  return dict(
      unet=unet, first_stage=first_stage, cond_stage=cond, concat=concat, ldm=ldm,
      scale_factor=float(params.get("scale_factor", 1.0)),
      schedule=dict(name=params.get("beta_schedule", "linear"), num_timesteps=int(params.get("timesteps", 1000)),
                    linear_start=float(params.get("linear_start", 1e-4)),
                    linear_end=float(params.get("linear_end", 2e-2))),
      prediction_type=params.get("parameterization", "eps"),
      image_size=int(params.get("image_size", unet.get("image_size", 64))) * factor,
  )


# ----------------------------------------------------------------------------- from shapes

def _indices(keys, pattern: str) -> list[int]:
  rx = re.compile(pattern)
  return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def _component(sd: Mapping[str, Any], prefix: str, marker: str, what: str):
  """(shape of a key under ``prefix``, the keys under it without ``prefix``); fails without ``marker``."""
  keys = [k[len(prefix):] for k in sd if k.startswith(prefix)]
  if marker not in keys:
    raise ValueError(f"no {what} in this checkpoint (no {prefix}{marker})")

  def shape(k: str) -> tuple[int, ...]:
    if prefix + k not in sd:
      raise StateDictMismatchError(missing=[prefix + k], what=f"checkpoint's {what}")
    return tuple(np.shape(sd[prefix + k]))

  return shape, keys


def _read_architecture(read, sd: Mapping[str, Any], what: str, prefix: str):
  """``read(sd)``, with a checkpoint whose keys stop short of a whole network named as such."""
  try:
    return read(sd)
  except KeyError as e:
    raise StateDictMismatchError(missing=[str(e.args[0])], what=f"checkpoint's {what}") from e
  except (IndexError, StopIteration) as e:
    found = sum(k.startswith(prefix) for k in sd)
    raise StateDictMismatchError(
        missing=[f"{prefix}...: the {found} keys under {prefix} do not make a whole {what} (incomplete file?)"],
        what=f"checkpoint's {what}") from e


def unet_fields_from_state_dict(sd: Mapping[str, Any], prefix: str = UNET_PREFIX) -> dict[str, Any]:
  """UNetModel fields of an original SD UNet, read from its shapes (heads by SD's convention)."""
  shape, keys = _component(sd, prefix, "input_blocks.0.0.weight", "UNet")
  mc, in_ch = shape("input_blocks.0.0.weight")[:2]
  levels, nrb, attends = [[]], [], []
  for i in _indices(keys, r"input_blocks\.(\d+)\.")[1:]:
    if f"input_blocks.{i}.0.op.weight" in keys:
      levels.append([])
    else:
      levels[-1].append(i)
  mult = []
  for blocks in levels:
    nrb.append(len(blocks))
    mult.append(shape(f"input_blocks.{blocks[0]}.0.out_layers.3.weight")[0] // mc)
    attends.append(any(f"input_blocks.{b}.1.proj_in.weight" in keys for b in blocks))
  att_block = next(k.split(".transformer_blocks")[0] for k in keys if ".transformer_blocks." in k)
  depth = len(_indices(keys, re.escape(att_block) + r"\.transformer_blocks\.(\d+)\."))
  context_dim = shape(f"{att_block}.transformer_blocks.0.attn2.to_k.weight")[1]
  heads = {768: dict(num_heads=8, num_head_channels=-1), 1024: dict(num_heads=-1, num_head_channels=64)}
  if context_dim not in heads:
    raise ValueError(f"context dim {context_dim} is neither SD v1's 768 nor SD v2's 1024: the attention heads "
                     "cannot be read off the weights; pass the model's YAML config")
  fields = dict(
      image_size=64, in_channels=in_ch, out_channels=shape("out.2.weight")[0], model_channels=mc,
      channel_mult=tuple(mult), num_res_blocks=nrb[0] if len(set(nrb)) == 1 else tuple(nrb),
      attention_resolutions=tuple(2**lvl for lvl in reversed(range(len(levels))) if attends[lvl]),
      use_spatial_transformer=True, transformer_depth=depth, context_dim=context_dim,
      use_linear_in_transformer=len(shape(f"{att_block}.proj_in.weight")) == 2, legacy=False,
      use_scale_shift_norm=shape("input_blocks.1.0.emb_layers.1.weight")[0] == 2 * mult[0] * mc,
      **heads[context_dim],
  )
  if "label_emb.weight" in keys:
    fields["num_classes"] = shape("label_emb.weight")[0]
  return fields


def vae_section_from_state_dict(sd: Mapping[str, Any], prefix: str = VAE_PREFIX) -> dict[str, Any]:
  """KL ``first_stage`` section of an original VAE, read from its shapes (GroupNorm(32), 256 px)."""
  shape, keys = _component(sd, prefix, "encoder.conv_in.weight", "autoencoder")
  ch, in_ch = shape("encoder.conv_in.weight")[:2]
  levels = _indices(keys, r"encoder\.down\.(\d+)\.")
  mult = tuple(shape(f"encoder.down.{i}.block.0.conv2.weight")[0] // ch for i in levels)
  z = shape("decoder.conv_in.weight")[1]
  attn = [i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in keys]
  ddconfig = dict(
      double_z=shape("encoder.conv_out.weight")[0] == 2 * z, z_channels=z, resolution=256, in_channels=in_ch,
      out_ch=shape("decoder.conv_out.weight")[0], ch=ch, ch_mult=mult,
      num_res_blocks=len(_indices(keys, r"encoder\.down\.0\.block\.(\d+)\.")),
      attn_resolutions=tuple(256 // 2**i for i in attn), dropout=0.0,
      use_mid_attn="encoder.mid.attn_1.q.weight" in keys,
  )
  return {"kind": "kl", "embed_dim": shape("quant_conv.weight")[0] // 2, "ddconfig": ddconfig}


def clip_section_from_state_dict(sd: Mapping[str, Any], prefix: str = COND_PREFIX) -> dict[str, Any]:
  """``cond_stage`` section of an SD checkpoint's CLIP text encoder (transformers or OpenCLIP names)."""
  keys = [k[len(prefix):] for k in sd if k.startswith(prefix)]
  get = lambda k: tuple(np.shape(sd[prefix + k]))  # a missing key: _read_architecture names it
  if "model.token_embedding.weight" in keys:  # OpenCLIP (SD 2.x): penultimate layer, GELU
    vocab, width = get("model.token_embedding.weight")
    return dict(
        kind="clip", preset="sd_v2", vocab_size=vocab, hidden_size=width,
        num_hidden_layers=len(_indices(keys, r"model\.transformer\.resblocks\.(\d+)\.")),
        intermediate_size=get("model.transformer.resblocks.0.mlp.c_fc.weight")[0],
        max_position_embeddings=get("model.positional_embedding")[0], num_attention_heads=width // 64,
    )
  base = "transformer.text_model."
  if base + "embeddings.token_embedding.weight" not in keys:
    raise ValueError(f"no CLIP text encoder in this checkpoint (no {prefix}{base}embeddings.token_embedding.weight "
                     f"or {prefix}model.token_embedding.weight)")
  vocab, width = get(base + "embeddings.token_embedding.weight")
  return dict(
      kind="clip", preset="sd_v1", vocab_size=vocab, hidden_size=width,
      num_hidden_layers=len(_indices(keys, re.escape(base) + r"encoder\.layers\.(\d+)\.")),
      intermediate_size=get(base + "encoder.layers.0.mlp.fc1.weight")[0],
      max_position_embeddings=get(base + "embeddings.position_embedding.weight")[0],
      num_attention_heads=width // 64,
  )


def sd_sections_from_state_dict(sd: Mapping[str, Any]) -> dict[str, Any]:
  """What :func:`sections_from_ldm_config` gives, for a Stable Diffusion checkpoint without its YAML."""
  unet = _read_architecture(unet_fields_from_state_dict, sd, "UNet", UNET_PREFIX)
  first_stage = _read_architecture(vae_section_from_state_dict, sd, "autoencoder", VAE_PREFIX)
  cond = _read_architecture(clip_section_from_state_dict, sd, "text encoder", COND_PREFIX)
  factor = 2 ** (len(first_stage["ddconfig"]["ch_mult"]) - 1)
  inpaint = unet["in_channels"] == 2 * first_stage["embed_dim"] + 1
  return dict(
      unet=unet, first_stage=first_stage, cond_stage=cond, concat={"kind": "inpaint"} if inpaint else None, ldm={},
      scale_factor=0.18215,
      schedule=dict(name="linear", num_timesteps=1000, linear_start=0.00085, linear_end=0.012),
      prediction_type="eps", image_size=unet["image_size"] * factor,
  )
