"""LoRA adapters as ``.safetensors`` files in the layout diffusers reads.

Written (and read) in the PEFT/diffusers layout that
``StableDiffusionPipeline.load_lora_weights`` and ``save_lora_weights`` use::

    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight   (r, in)
    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight   (out, r)
    unet.down_blocks.0.resnets.0.conv1.lora_A.weight                                (r, in, 3, 3)
    unet.down_blocks.0.resnets.0.conv1.lora_B.weight                                (out, r, 1, 1)
    text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight         (r, in)

with the scale in the safetensors metadata: ``lora_adapter_metadata`` (JSON,
``unet.r`` / ``unet.lora_alpha`` / ``unet.target_modules`` ..., which diffusers
hands to peft's ``LoraConfig``), kohya's ``ss_network_dim`` /
``ss_network_alpha``, and our ``ldm_jax_lora`` (the whole :class:`LoRAConfig`).

Also read: kohya files (``lora_unet_<module>.lora_down.weight`` /
``.lora_up.weight`` / ``.alpha``, diffusers or original module names), the
older diffusers ``<module>.lora.down.weight`` / ``.lora_linear_layer.up.weight``
and attention-processor (``attn1.processor.to_q_lora.down.weight``) variants,
per-module ``.alpha`` keys, and peft's ``alpha_pattern`` / ``use_rslora``.
Files without any alpha use peft's convention alpha = r (scale 1).

Names go through the existing converters: our parameter paths <-> original
names by ``naming``, original <-> diffusers UNet names by ``diffusers_unet``.
"""

import collections
import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from ldm_jax.interop import naming
from ldm_jax.interop.diffusers_unet import diffusers_unet_to_original, original_unet_to_diffusers
from ldm_jax.interop.openclip import add_text_model_prefix
from ldm_jax.interop.weights import read_state_dict
from ldm_jax.models.unet import UNetModel
from ldm_jax.nn.lora import LoRAConfig, adapter_shapes, merge

UNET, TEXT = "unet", "text_encoder"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
OUR_METADATA_KEY = "ldm_jax_lora"
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers writes and looks for in a folder
_KOHYA_PREFIXES = {"lora_unet_": UNET, "lora_te_": TEXT, "lora_te1_": TEXT}
# (regex over a key without its component prefix, which factor); "m" is the module name.
_SUFFIXES = (
    (re.compile(r"^(?P<m>.+)\.lora_A(\.default)?\.weight$"), "A"),
    (re.compile(r"^(?P<m>.+)\.lora_B(\.default)?\.weight$"), "B"),
    (re.compile(r"^(?P<m>.+)\.(lora|lora_linear_layer)\.down\.weight$"), "A"),
    (re.compile(r"^(?P<m>.+)\.(lora|lora_linear_layer)\.up\.weight$"), "B"),
    (re.compile(r"^(?P<m>.+)\.lora_down\.weight$"), "A"),
    (re.compile(r"^(?P<m>.+)\.lora_up\.weight$"), "B"),
    (re.compile(r"^(?P<m>.+)\.alpha$"), "alpha"),
)
# Attention-processor LoRA (diffusers < 0.20): "<attn>.processor.to_q_lora.down.weight".
_PROCESSOR = re.compile(r"^(?P<attn>.+?)(\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<f>down|up)\.weight$")
_PROCESSOR_PROJ = {
    UNET: {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    TEXT: {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}


@dataclasses.dataclass
class LoRAWeights:
  """Adapters read from a file: ``unet`` / ``text_encoder`` trees (or None) and their config."""

  config: LoRAConfig
  unet: dict[str, Any] | None = None
  text_encoder: dict[str, Any] | None = None


# ----------------------------------------------------------------------------- writing

def lora_state_dict(
    config: LoRAConfig, unet_model: UNetModel | Mapping[str, Any], *, unet: Mapping[str, Any] | None = None,
    text_encoder: Mapping[str, Any] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """``(state dict, safetensors metadata)`` of adapters in the diffusers layout (see module docstring)."""
  state: dict[str, np.ndarray] = {}
  peft_meta: dict[str, Any] = {}
  ranks: list[int] = []
  fields = _unet_fields(unet_model)
  for component, adapters in ((UNET, unet), (TEXT, text_encoder)):
    if adapters is None:
      continue
    torch_state = naming.flax_to_torch({"params": _lora_tree(_strip_params(adapters))})
    if component == UNET:
      torch_state = original_unet_to_diffusers(torch_state, fields)
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in torch_state})
    module_ranks = {m: int(torch_state[f"{m}.lora_A.weight"].shape[0]) for m in modules}
    rank = collections.Counter(module_ranks.values()).most_common(1)[0][0]
    ranks.extend(module_ranks.values())
    # Text encoder targets without "text_model.": peft matches name suffixes, and transformers 5's CLIPTextModel
    # has no text_model level.
    targets = [m.removeprefix("text_model.") for m in modules]
    peft_meta.update({
        f"{component}.r": rank, f"{component}.lora_alpha": float(config.alpha),
        f"{component}.target_modules": targets,
        f"{component}.rank_pattern": {m.removeprefix("text_model."): r for m, r in module_ranks.items() if r != rank},
    })
    state.update({f"{component}.{k}": np.ascontiguousarray(v, np.float32) for k, v in torch_state.items()})
  if not state:
    raise ValueError("no adapters to save: pass unet= and/or text_encoder=")
  metadata = {
      "format": "pt", METADATA_KEY: json.dumps(peft_meta, sort_keys=True),
      "ss_network_dim": str(collections.Counter(ranks).most_common(1)[0][0]), "ss_network_alpha": str(config.alpha),
      OUR_METADATA_KEY: json.dumps(dataclasses.asdict(config)),
  }
  return state, metadata


def save_lora(
    path: str | os.PathLike, config: LoRAConfig, unet_model: UNetModel | Mapping[str, Any], *,
    unet: Mapping[str, Any] | None = None, text_encoder: Mapping[str, Any] | None = None,
) -> str:
  """Writes adapters to ``path`` (a ``.safetensors`` file, or a folder: ``<folder>/pytorch_lora_weights.safetensors``).

  ``unet_model`` (the UNet or its fields) decides the diffusers module names.
  Returns the file written; diffusers loads it with
  ``pipe.load_lora_weights(folder, weight_name=...)`` or the file's path.
  """
  path = os.fspath(path)
  if not path.endswith(".safetensors"):
    os.makedirs(path, exist_ok=True)
    path = os.path.join(path, WEIGHT_NAME)
  state, metadata = lora_state_dict(config, unet_model, unet=unet, text_encoder=text_encoder)
  save_file(state, path, metadata=metadata)
  return path


# ----------------------------------------------------------------------------- reading

def load_lora(
    path: str | os.PathLike, unet_model: UNetModel | Mapping[str, Any], unet_params: Mapping[str, Any], *,
    text_params: Mapping[str, Any] | None = None,
) -> LoRAWeights:
  """Reads a LoRA file (any layout of the module docstring) as adapters for our UNet (and text encoder).

  Args:
    path: a ``.safetensors`` file, or a folder holding ``pytorch_lora_weights.safetensors``.
    unet_model: the UNet (or its fields), for the diffusers <-> original names.
    unet_params / text_params: the model's variables (arrays or shapes); the
      adapters come back with the same top level (e.g. ``{"params": ...}``).
      Every adapter's shape is checked against its kernel; all missing,
      unexpected and mis-shaped keys are named in one
      :class:`~ldm_jax.interop.naming.StateDictMismatchError`.
  """
  file = _lora_file(os.fspath(path))
  with safe_open(file, framework="numpy") as f:
    metadata = f.metadata() or {}
  return lora_from_state_dict(read_state_dict(file), metadata, unet_model, unet_params, text_params=text_params,
                              what=file)


def lora_from_state_dict(
    state: Mapping[str, Any], metadata: Mapping[str, str] | None, unet_model: UNetModel | Mapping[str, Any],
    unet_params: Mapping[str, Any], *, text_params: Mapping[str, Any] | None = None, what: str = "LoRA state dict",
) -> LoRAWeights:
  """:func:`load_lora` on an in-memory state dict and its safetensors metadata."""
  metadata = dict(metadata or {})
  if any("dora_scale" in k or "lora_magnitude_vector" in k for k in state):
    raise ValueError(f"{what}: DoRA adapters (dora_scale / lora_magnitude_vector) are not supported, only LoRA")
  fields = _unet_fields(unet_model)
  templates = {UNET: unet_params, TEXT: text_params}
  factors, alphas, unexpected, sources = _split_keys(state, fields, templates)
  if text_params is None and TEXT in factors:
    factors.pop(TEXT)
    unexpected += [f"{k} (the file adapts the text encoder: pass text_params)" for k in sources[TEXT].values()]
  peft_meta = json.loads(metadata.get(METADATA_KEY) or "{}")
  ours = json.loads(metadata[OUR_METADATA_KEY]) if OUR_METADATA_KEY in metadata else None

  errors: list[naming.StateDictMismatchError] = []
  loaded: dict[str, dict[tuple[str, ...], dict[str, np.ndarray]]] = {}
  module_alphas: dict[tuple[str, tuple[str, ...]], float] = {}
  for component, keys in factors.items():
    # Each module's alpha in our convention (scale = alpha / r), resolved under the file's names, then renamed
    # along with the weights as a "<module>.alpha" entry.
    keys = dict(keys)
    for k, v in list(keys.items()):
      if k.endswith(".lora_A.weight"):
        module = k.removesuffix(".lora_A.weight")
        keys[module + ".alpha"] = _file_alpha(component, module, v.shape[0], alphas, peft_meta, metadata)
    names = dict(sources[component])  # our key -> the file's key, for error messages
    if component == UNET:
      keys, stray, renamed_from = _rename_unet(keys, fields)
      unexpected += [names.get(k, k) for k in stray if not k.endswith(".alpha")]
      names = {new: names.get(old, old) for new, old in renamed_from.items()}
    for k in [k for k in keys if k.endswith(".alpha")]:
      module_alphas[(component, naming.torch_key_to_module_path(k)[0])] = keys.pop(k)
    try:
      loaded[component] = _to_adapters(keys, templates[component], f"{component}.", what)
    except naming.StateDictMismatchError as e:
      errors.append(_in_file_names(e, names, f"{component}."))
  if errors or unexpected:
    raise naming.StateDictMismatchError(
        [m for e in errors for m in e.missing], unexpected + [u for e in errors for u in e.unexpected],
        [m for e in errors for m in e.mismatched], what=what)
  if not any(loaded.values()):
    raise ValueError(f"{what} holds no LoRA weights")

  # One alpha for the config (the most common); modules meant with another fold the ratio into up.
  ranks = [pair["down"].shape[-1] for modules in loaded.values() for pair in modules.values()]
  rank = collections.Counter(ranks).most_common(1)[0][0]
  alpha = collections.Counter(module_alphas[(c, m)] for c in loaded for m in loaded[c]).most_common(1)[0][0]
  out = {}
  for component, modules in loaded.items():
    prefix = ("params",) if "params" in templates[component] else ()
    flat = {}
    for module, pair in modules.items():
      fold = module_alphas[(component, module)] / alpha
      up = pair["up"] if fold == 1.0 else (pair["up"] * np.float32(fold)).astype(np.float32)
      flat[(*prefix, *module, "down")], flat[(*prefix, *module, "up")] = pair["down"], up
    out[component] = traverse_util.unflatten_dict(flat)
  if ours is not None:
    config = LoRAConfig(rank=rank, alpha=alpha, targets=tuple(ours["targets"]), init=ours["init"])
  else:
    paths = sorted("/".join((*(("params",) if "params" in templates[c] else ()), *m)) for c in loaded
                   for m in loaded[c])
    config = LoRAConfig(rank=rank, alpha=alpha, targets=tuple(f"^{re.escape(p)}$" for p in paths))
  return LoRAWeights(config, out.get(UNET), out.get(TEXT))


def apply_lora_file(pipeline, path: str | os.PathLike, *, scale: float = 1.0):
  """A copy of an ``LDMPipeline`` with the LoRA file's adapters merged in (``scale``: diffusers' lora_scale)."""
  params, frozen = dict(pipeline.params), dict(pipeline.frozen)
  cond_home = params if "cond" in params else frozen if "cond" in frozen else None
  is_clip = getattr(pipeline.model.cond_stage, "kind", None) == "clip"
  text = cond_home["cond"] if cond_home is not None and is_clip else None
  weights = load_lora(path, pipeline.model.unet, params["unet"], text_params=text)
  params["unet"] = merge(params["unet"], weights.unet or {}, weights.config, scale=scale)
  if weights.text_encoder is not None:
    cond_home["cond"] = merge(text, weights.text_encoder, weights.config, scale=scale)
  return dataclasses.replace(pipeline, params=params, frozen=frozen)


# ----------------------------------------------------------------------------- helpers

def _unet_fields(unet_model: UNetModel | Mapping[str, Any]) -> Mapping[str, Any]:
  if isinstance(unet_model, Mapping):
    return unet_model
  return {f.name: getattr(unet_model, f.name) for f in dataclasses.fields(unet_model) if f.name not in
          ("parent", "name")}


def _strip_params(adapters: Mapping[str, Any]) -> Mapping[str, Any]:
  return adapters["params"] if set(adapters) == {"params"} else adapters


def _lora_tree(adapters: Mapping[str, Any]) -> dict[str, Any]:
  """``{module: {"down", "up"}}`` -> ``{module: {"lora_A": {"kernel"}, "lora_B": {"kernel"}}}`` (naming's layout)."""
  flat = {}
  for path, value in traverse_util.flatten_dict(adapters).items():
    *module, leaf = path
    if leaf not in ("down", "up"):
      raise ValueError(f"adapter leaf {'/'.join(path)}: expected .../down or .../up")
    flat[(*module, "lora_A" if leaf == "down" else "lora_B", "kernel")] = np.asarray(jax.device_get(value),
                                                                                    np.float32)
  return traverse_util.unflatten_dict(flat)


def _lora_file(path: str) -> str:
  if os.path.isdir(path):
    candidates = [os.path.join(path, WEIGHT_NAME)] + sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    for c in candidates:
      if os.path.isfile(c):
        return c
    raise FileNotFoundError(f"no LoRA weights in {path}: expected {WEIGHT_NAME} or another .safetensors file")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"LoRA file {path!r} does not exist")
  return path


def _torch_modules(params: Mapping[str, Any]) -> list[str]:
  """Original (dotted) names of every kernel's module in ``params``."""
  tree = {"params": _strip_params(params)}
  return [k.rsplit(".", 1)[0] for k, _ in naming.torch_shapes(tree).items() if k.endswith(".weight")]


def _kohya_table(fields: Mapping[str, Any], templates: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
  """kohya's flattened module names (``lora_unet_down_blocks_0_...``) -> (component, dotted name)."""
  table = {}
  if templates[UNET] is not None:
    original = _torch_modules(templates[UNET])
    diffusers = original_unet_to_diffusers({m + ".weight": None for m in original}, fields)
    for d in diffusers:
      table["lora_unet_" + d[: -len(".weight")].replace(".", "_")] = (UNET, d[: -len(".weight")])
    # Original-named kohya files (SGM layout): resolve to the same diffusers name.
    for o, d in zip(original, diffusers):
      table.setdefault("lora_unet_" + o.replace(".", "_"), (UNET, d[: -len(".weight")]))
  if templates[TEXT] is not None:
    for m in _torch_modules(templates[TEXT]):
      for kohya in ("lora_te_", "lora_te1_"):
        table[kohya + m.replace(".", "_")] = (TEXT, m)
  return table


def _split_keys(state, fields, templates):
  """Sorts keys by component: ``{component: {"<module>.lora_A.weight": array}}``, alphas, unexpected keys,
  ``{component: {our key: file key}}``."""
  factors: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
  sources: dict[str, dict[str, str]] = collections.defaultdict(dict)
  alphas: dict[tuple[str, str], float] = {}
  unexpected: list[str] = []
  kohya = None
  for key, value in state.items():
    value = np.asarray(value)
    if key.startswith(tuple(_KOHYA_PREFIXES)):
      kohya = kohya if kohya is not None else _kohya_table(fields, templates)
      flat_name, _, rest = key.partition(".")
      if flat_name not in kohya:
        unexpected.append(f"{key} (no such module)")
        continue
      component, module = kohya[flat_name]
      key_rest = f"{module}.{rest}"
    else:
      component, key_rest = (TEXT, key[len(TEXT) + 1:]) if key.startswith(TEXT + ".") else (
          (UNET, key[len(UNET) + 1:]) if key.startswith(UNET + ".") else (UNET, key))  # oldest files: no prefix
    parsed = _parse(component, key_rest)
    if parsed is None:
      unexpected.append(key)
      continue
    module, factor = parsed
    if component == TEXT:
      module = next(iter(add_text_model_prefix({module + ".weight": 0}))).removesuffix(".weight")
    if factor == "alpha":
      alphas[(component, module)] = float(value.reshape(-1)[0])
    else:
      factors[component][f"{module}.lora_{factor}.weight"] = value
      sources[component][f"{module}.lora_{factor}.weight"] = key
  return dict(factors), alphas, unexpected, sources


def _parse(component: str, key: str) -> tuple[str, str] | None:
  match = _PROCESSOR.match(key)
  if match:
    return f"{match['attn']}.{_PROCESSOR_PROJ[component][match['proj']]}", "A" if match["f"] == "down" else "B"
  for pattern, factor in _SUFFIXES:
    match = pattern.match(key)
    if match:
      return match["m"], factor
  return None


def _rename_unet(keys: Mapping[str, Any], fields: Mapping[str, Any]):
  """diffusers -> original names (keys already original pass); returns (renamed, strays, {new key: old key})."""
  original_roots = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "out.", "label_emb.")
  original = {k: v for k, v in keys.items() if k.startswith(original_roots)}
  rest = {k: v for k, v in keys.items() if k not in original}
  try:
    stray: list[str] = []
    renamed = diffusers_unet_to_original(rest, fields)
  except naming.StateDictMismatchError as e:
    stray = sorted(set(e.unexpected))
    rest = {k: v for k, v in rest.items() if k not in e.unexpected}
    renamed = diffusers_unet_to_original(rest, fields)
  renamed_from = {**{k: k for k in original}, **dict(zip(renamed, rest))}  # the rename keeps the order
  return {**original, **renamed}, stray, renamed_from


def _in_file_names(error: naming.StateDictMismatchError, names: Mapping[str, str], prefix: str):
  """The error with the file's own key names (a missing factor named by its partner in the file)."""
  def name(key: str) -> str:
    return names.get(key.removeprefix(prefix), key)

  missing = []
  for path in error.missing:  # "params/<module>/lora_B/kernel"
    _, *module, factor, _ = path.split("/")
    partner = "lora_A" if factor == "lora_B" else "lora_B"
    key = ".".join(naming.flax_name_to_torch(n) for n in module) + f".{partner}.weight"
    missing.append(f"{names[key]} (its {factor} is missing)" if key in names else path)
  return naming.StateDictMismatchError(missing, [name(k) for k in error.unexpected],
                                       [(name(k), a, b) for k, a, b in error.mismatched])


def _to_adapters(keys: Mapping[str, np.ndarray], params: Mapping[str, Any], prefix: str, what: str):
  """``{module path: {"down", "up"}}`` with every shape checked against ``params``."""
  kernels = traverse_util.flatten_dict({"params": _strip_params(params)})
  template: dict[tuple[str, ...], jax.ShapeDtypeStruct] = {}
  for key, value in keys.items():
    (*module, factor), _ = naming.torch_key_to_module_path(key)
    kernel = kernels.get(("params", *module, "kernel"))
    if kernel is None:
      continue  # torch_to_flax reports it as unexpected
    rank = value.shape[0] if factor == "lora_A" else value.shape[1] if value.ndim > 1 else 1
    try:
      down, up = adapter_shapes(kernel.shape, rank)
    except ValueError:
      continue
    for f, shape in (("lora_A", down), ("lora_B", up)):
      template[("params", *module, f, "kernel")] = jax.ShapeDtypeStruct(shape, np.float32)
  named = {prefix + k: v for k, v in keys.items()}
  tree = naming.torch_to_flax(named, traverse_util.unflatten_dict(template), strip_prefix=prefix, what=what)
  out: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
  for path, value in traverse_util.flatten_dict(tree).items():
    _, *module, factor, _ = path
    out.setdefault(tuple(module), {})["down" if factor == "lora_A" else "up"] = value
  return out


def _file_alpha(component: str, module: str, rank: int, alphas, peft_meta, metadata) -> float:
  """The alpha that gives ``module`` the file's own scale as ``alpha / rank``.

  Per-module ``.alpha`` keys first, then peft's ``alpha_pattern`` and
  ``lora_alpha``, then kohya's ``ss_network_alpha``; none: alpha = rank
  (scale 1). rsLoRA files mean alpha / sqrt(r).
  """
  alpha = alphas.get((component, module))
  short = module.removeprefix("text_model.") if component == TEXT else module
  if alpha is None:
    for pattern, value in (peft_meta.get(f"{component}.alpha_pattern") or {}).items():
      if re.match(pattern + "$" if pattern.startswith("^") else rf"(.*\.)?{pattern}$", short):
        alpha = float(value)
        break
  if alpha is None and f"{component}.lora_alpha" in peft_meta:
    alpha = float(peft_meta[f"{component}.lora_alpha"])
  if alpha is None and "ss_network_alpha" in metadata:
    try:
      alpha = float(metadata["ss_network_alpha"])
    except ValueError:
      alpha = None
  if alpha is None:
    return float(rank)
  return alpha * math.sqrt(rank) if peft_meta.get(f"{component}.use_rslora") else alpha
