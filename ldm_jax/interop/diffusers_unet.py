"""diffusers ``UNet2DConditionModel`` <-> original CompVis UNet state dicts.

The two layouts hold the same tensors under different module names
(``down_blocks.1.resnets.0.conv1`` is ``input_blocks.4.0.in_layers.2``); the
transformer internals (``transformer_blocks.0.attn1.to_q`` ...) and every
tensor layout agree, including SD v2's linear ``proj_in``/``proj_out``, so the
conversion is a pure rename and values pass through untouched. Which module
goes where depends on the architecture (res blocks per level, which levels
attend), so every function takes the model's config: a diffusers
``config.json`` dict or our :class:`~ldm_jax.models.unet.UNetModel` fields.

Loading a diffusers UNet into our parameters::

    fields = unet_fields_from_diffusers_config(json.load(open("unet/config.json")))
    original = diffusers_unet_to_original(safetensors_state_dict, fields)
    params = naming.torch_to_flax(original, jax.eval_shape(UNetModel(**fields).init, ...))
"""

from collections.abc import Mapping, Sequence
from typing import Any

from ldm_jax.interop.naming import StateDictMismatchError

# ResBlock sub-modules: original name -> diffusers ResnetBlock2D name.
RESNET_PARTS = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
)

# UNet2DConditionModel.__init__ defaults (diffusers fills these in for keys a
# config.json leaves out).
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "only_cross_attention": False, "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": 0.0, "act_fn": "silu",
    "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 1280, "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "attention_head_dim": 8, "num_attention_heads": None, "dual_cross_attention": False,
    "use_linear_projection": False, "class_embed_type": None, "addition_embed_type": None,
    "addition_time_embed_dim": None, "num_class_embeds": None, "upcast_attention": False,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None, "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None, "addition_embed_type_num_heads": 64,
}
# Options read below; every other option must keep its default. (upcast_attention
# is moot: our softmax statistics are float32 whatever the compute dtype;
# addition_embed_type_num_heads only matters with an addition embedding.)
_MAPPED = {
    "sample_size", "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
    "layers_per_block", "dropout", "norm_num_groups", "cross_attention_dim", "transformer_layers_per_block",
    "attention_head_dim", "use_linear_projection", "class_embed_type", "num_class_embeds",
    "resnet_time_scale_shift", "upcast_attention", "addition_embed_type_num_heads",
}


def unet_fields_from_diffusers_config(config_json: Mapping[str, Any]) -> dict[str, Any]:
  """UNetModel fields for a diffusers ``UNet2DConditionModel`` ``config.json``.

  diffusers' ``attention_head_dim`` is really the number of heads per level
  (SD v1: 8; SD v2: [5, 10, 20, 20]); a constant head count becomes
  ``num_heads``, a constant ``channels / heads`` becomes ``num_head_channels``.
  Options our UNet cannot express raise a ValueError that names all of them.
  """
  unknown = sorted(k for k in config_json if not k.startswith("_") and k not in _DIFFUSERS_DEFAULTS)
  cfg = {**_DIFFUSERS_DEFAULTS, **config_json}
  problems = [f"unknown option(s) {unknown}"] if unknown else []
  for key, default in _DIFFUSERS_DEFAULTS.items():
    if key not in _MAPPED and not _is_default(cfg[key], default):
      problems.append(f"{key}={cfg[key]!r} (only {default!r} is supported)")

  channels = list(cfg["block_out_channels"])
  levels = len(channels)
  model_channels = channels[0]
  if any(c % model_channels for c in channels):
    problems.append(f"block_out_channels {channels} are not multiples of the first")
  if len(cfg["down_block_types"]) != levels:
    raise ValueError(f"Unsupported diffusers UNet config: {levels} block_out_channels but down_block_types "
                     f"{list(cfg['down_block_types'])}")
  attends = _attending_levels(cfg["down_block_types"], cfg["up_block_types"], problems)
  layers, context_dims, depths, heads = (
      _per_level(cfg[key], levels, key, problems)
      for key in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim")
  )
  for key, values in (("cross_attention_dim", context_dims), ("transformer_layers_per_block", depths)):
    if len(set(map(repr, values))) > 1 or not isinstance(values[0], int):
      problems.append(f"{key}={cfg[key]!r} (one integer for all levels only)")
  if not all(isinstance(h, int) and h > 0 for h in heads):
    raise ValueError(f"Unsupported diffusers UNet config: attention_head_dim={cfg['attention_head_dim']!r}")
  if not isinstance(cfg["norm_num_groups"], int):
    problems.append(f"norm_num_groups={cfg['norm_num_groups']!r} (the UNet needs group norms)")

  fields: dict[str, Any] = dict(
      image_size=cfg["sample_size"], in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
      model_channels=model_channels, channel_mult=tuple(c // model_channels for c in channels),
      num_res_blocks=layers[0] if len(set(layers)) == 1 else tuple(layers),
      # Descending, as the reference configs write them ([4, 2, 1]).
      attention_resolutions=tuple(2**level for level, a in reversed(list(enumerate(attends))) if a),
      dropout=float(cfg["dropout"]), use_spatial_transformer=True, transformer_depth=depths[0],
      context_dim=context_dims[0], use_linear_in_transformer=bool(cfg["use_linear_projection"]), legacy=False,
      norm_num_groups=cfg["norm_num_groups"], use_scale_shift_norm=cfg["resnet_time_scale_shift"] == "scale_shift",
      **_head_fields(channels, heads, attends, problems),
  )
  if cfg["resnet_time_scale_shift"] not in ("default", "scale_shift"):
    problems.append(f"resnet_time_scale_shift={cfg['resnet_time_scale_shift']!r}")

  if cfg["class_embed_type"] is not None:
    problems.append(f"class_embed_type={cfg['class_embed_type']!r} (only None, with or without num_class_embeds)")
  elif cfg["num_class_embeds"] is not None:
    fields["num_classes"] = cfg["num_class_embeds"]

  if problems:
    raise ValueError("Unsupported diffusers UNet config: " + "; ".join(problems))
  return fields


def diffusers_unet_to_original(
    state_dict: Mapping[str, Any], config: Mapping[str, Any], *, original_prefix: str = ""
) -> dict[str, Any]:
  """Renames a diffusers UNet state dict to the CompVis names (``original_prefix`` prepended)."""
  pairs = [(d, o) for o, d in _module_pairs(_fields(config))]
  renamed = _rename(state_dict, pairs, what="diffusers UNet state dict")
  return {original_prefix + k: v for k, v in renamed.items()}


def original_unet_to_diffusers(
    state_dict: Mapping[str, Any], config: Mapping[str, Any], *, original_prefix: str = ""
) -> dict[str, Any]:
  """Renames a CompVis UNet state dict to diffusers names.

  With ``original_prefix`` (e.g. ``"model.diffusion_model."`` for a full SD
  checkpoint) only the keys under it are converted; the rest are left out.
  """
  unet = {k[len(original_prefix):]: v for k, v in state_dict.items() if k.startswith(original_prefix)}
  return _rename(unet, _module_pairs(_fields(config)), what="original UNet state dict")


def _fields(config: Mapping[str, Any]) -> Mapping[str, Any]:
  return config if "model_channels" in config else unet_fields_from_diffusers_config(config)


def _module_pairs(fields: Mapping[str, Any]) -> list[tuple[str, str]]:
  """(original module, diffusers module) for every module of this architecture."""
  unsupported = [
      name for name, bad in (
          ("use_spatial_transformer=False (legacy AttentionBlock)", not fields.get("use_spatial_transformer")),
          ("resblock_updown=True", fields.get("resblock_updown")),
          ("conv_resample=False", fields.get("conv_resample", True) is False),
      ) if bad
  ]
  if unsupported:
    raise ValueError(f"UNet2DConditionModel has no equivalent for {', '.join(unsupported)}")
  levels = len(fields["channel_mult"])
  nrb = fields["num_res_blocks"]
  nrb = (nrb,) * levels if isinstance(nrb, int) else tuple(nrb)
  attends = [2**level in fields["attention_resolutions"] for level in range(levels)]

  pairs = [
      ("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
      ("input_blocks.0.0", "conv_in"), ("out.0", "conv_norm_out"), ("out.2", "conv_out"),
  ]
  if fields.get("num_classes") is not None:
    pairs.append(("label_emb", "class_embedding"))

  def resnet(original: str, diffusers: str) -> None:
    pairs.extend((f"{original}.{o}", f"{diffusers}.{d}") for o, d in RESNET_PARTS)

  index = 1
  for level in range(levels):
    for j in range(nrb[level]):
      resnet(f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{j}")
      if attends[level]:
        pairs.append((f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{j}"))
      index += 1
    if level != levels - 1:
      pairs.append((f"input_blocks.{index}.0.op", f"down_blocks.{level}.downsamplers.0.conv"))
      index += 1
  resnet("middle_block.0", "mid_block.resnets.0")
  pairs.append(("middle_block.1", "mid_block.attentions.0"))
  resnet("middle_block.2", "mid_block.resnets.1")
  index = 0
  for up, level in enumerate(reversed(range(levels))):
    for j in range(nrb[level] + 1):
      resnet(f"output_blocks.{index}.0", f"up_blocks.{up}.resnets.{j}")
      if attends[level]:
        pairs.append((f"output_blocks.{index}.1", f"up_blocks.{up}.attentions.{j}"))
      if level and j == nrb[level]:
        pairs.append((f"output_blocks.{index}.{1 + attends[level]}.conv", f"up_blocks.{up}.upsamplers.0.conv"))
      index += 1
  return pairs


def _rename(state_dict: Mapping[str, Any], pairs: list[tuple[str, str]], what: str) -> dict[str, Any]:
  """Renames each key by its longest module prefix found in ``pairs``; reports strays at once."""
  table = dict(pairs)
  out, unexpected = {}, []
  for key, value in state_dict.items():
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
      prefix = ".".join(parts[:n])
      if prefix in table:
        out[".".join([table[prefix], *parts[n:]])] = value
        break
    else:
      unexpected.append(key)
  if unexpected:
    raise StateDictMismatchError(unexpected=unexpected, what=what)
  return out


def _attending_levels(down_types: Sequence[str], up_types: Sequence[str], problems: list[str]) -> list[bool]:
  """Which levels have cross-attention; the up blocks must mirror the down blocks."""
  for kind in down_types:
    if kind not in ("CrossAttnDownBlock2D", "DownBlock2D"):
      problems.append(f"down block type {kind!r} (only CrossAttnDownBlock2D / DownBlock2D)")
  attends = [kind == "CrossAttnDownBlock2D" for kind in down_types]
  expected_up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)]
  if list(up_types) != expected_up:
    problems.append(f"up_block_types {list(up_types)} must mirror down_block_types ({expected_up})")
  return attends


def _head_fields(channels: list[int], heads: list[int], attends: list[bool], problems: list[str]) -> dict[str, int]:
  """``num_heads`` (constant head count) or ``num_head_channels`` (constant head size)."""
  # Heads matter where there is attention: the attending levels and the middle block.
  used = [level for level, a in enumerate(attends) if a] + [len(channels) - 1]
  counts = {heads[level] for level in used}
  sizes = {channels[level] / heads[level] for level in used}
  if len(counts) == 1:
    return dict(num_heads=counts.pop(), num_head_channels=-1)
  if len(sizes) == 1 and float(next(iter(sizes))).is_integer():
    return dict(num_heads=-1, num_head_channels=int(sizes.pop()))
  problems.append(f"attention_head_dim {heads}: neither a constant head count nor a constant head size")
  return dict(num_heads=-1, num_head_channels=-1)


def _per_level(value: Any, levels: int, key: str, problems: list[str]) -> list[Any]:
  if isinstance(value, (list, tuple)):
    if len(value) != levels:
      problems.append(f"{key} has {len(value)} entries for {levels} levels")
      return [value[0]] * levels
    return list(value)
  return [value] * levels


def _is_default(value: Any, default: Any) -> bool:
  if isinstance(value, (list, tuple)) and not isinstance(default, (list, tuple)):
    return all(_is_default(v, default) for v in value)  # per-level lists of the default
  if default is None and value is False:
    return True  # e.g. mid_block_only_cross_attention: None and False both mean "off"
  return value == default
