"""``load_pretrained_pipeline(path)``: published checkpoints as a ready-to-sample ``LDMPipeline``.

Accepted ``path``:

- a diffusers folder (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
  ``scheduler/``; weights as ``.safetensors`` or ``.bin``);
- an original single file (``.safetensors``; ``.ckpt``/``.pt``/``.bin`` only
  through ``torch.load(weights_only=True)``): Stable Diffusion v1.x / v2.x /
  inpainting, or the paper's LDMs with their YAML config (``config=``, or
  ``<file stem>.yaml`` beside the file).

Every component is checked before anything is returned: all missing,
unexpected and mis-shaped keys of the whole checkpoint come in one
:class:`~ldm_jax.interop.naming.StateDictMismatchError`.
"""

import glob
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from ldm_jax.data.tokenizers import tokenize
from ldm_jax.diffusion.schedules import DiffusionSchedule, make_schedule, schedule_name_from_diffusers
from ldm_jax.interop import ldm_config, naming
from ldm_jax.interop.cond_stage import load_cond_stage_variables
from ldm_jax.interop.diffusers_unet import diffusers_unet_to_original, unet_fields_from_diffusers_config
from ldm_jax.interop.diffusers_vae import diffusers_vae_to_original, first_stage_from_diffusers_config
from ldm_jax.interop.weights import read_state_dict
from ldm_jax.models.build import build_latent_diffusion
from ldm_jax.pipeline import LDMPipeline

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
# Buffers of the reference LatentDiffusion that are not weights (schedule tables, EMA counters).
_BUFFERS = re.compile(
    r"^(betas|alphas_cumprod(_prev)?|sqrt_.*|log_one_minus_alphas_cumprod|posterior_.*|logvar|lvlb_weights|"
    r"scale_factor|model_ema\.(decay|num_updates))$"
)
# Classes whose default timestep_spacing is not "leading" (a scheduler_config.json may leave it out).
_LINSPACE_SCHEDULERS = ("DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")
_PREDICTION = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def load_pretrained_pipeline(
    path: str,
    *,
    mesh=None,
    compute_dtype: str | None = None,
    use_ema: bool = True,
    config: str | Mapping[str, Any] | None = None,
    tokenizer: str | None = None,
    prediction_type: str | None = None,
):
  """An ``LDMPipeline`` for a diffusers folder or an original checkpoint file (see module docstring).

  Args:
    mesh: devices to sample on (default: all local devices).
    compute_dtype: e.g. ``"bfloat16"`` on TPU/GPU; parameters stay float32.
    use_ema: original files with ``model_ema.*`` keys: take the EMA UNet weights.
    config: reference YAML (path or dict) for an original file.
    tokenizer: tokenizer folder for an original file (default: ``tokenizer/`` beside it).
    prediction_type: ``eps`` / ``v`` / ``x0``, overriding the config (SD 2.x 768-v: ``"v"``).
  """
  parts = read_parts(path, use_ema=use_ema, config=config, tokenizer=tokenizer, prediction_type=prediction_type)
  return assemble_pipeline(parts, mesh=mesh, compute_dtype=compute_dtype or "float32")


def read_parts(path: str, *, use_ema: bool = True, config=None, tokenizer: str | None = None,
               prediction_type: str | None = None) -> dict[str, Any]:
  """What a published checkpoint holds: model description, schedule, tokenizer folder, PyTorch state dict."""
  if os.path.isdir(path):
    parts = _diffusers_parts(path)
  elif os.path.isfile(path):
    parts = _single_file_parts(path, use_ema=use_ema, config=config, tokenizer=tokenizer)
  else:
    raise FileNotFoundError(f"checkpoint {path!r} does not exist")
  if prediction_type is not None:
    parts["prediction_type"] = prediction_type
  return parts


# ----------------------------------------------------------------------------- diffusers folders

def read_component(folder: str) -> dict[str, np.ndarray]:
  """The state dict of a diffusers component folder (sharded or not; full precision files preferred)."""
  for ext in (".safetensors", ".bin"):
    files = sorted(glob.glob(os.path.join(folder, f"*{ext}")))
    plain = [f for f in files if not re.search(r"\.(fp16|bf16|non_ema|ema)\.", os.path.basename(f))]
    files = plain or files[:1]
    if files:
      out: dict[str, np.ndarray] = {}
      for f in files:
        out.update(read_state_dict(f))
      return out
  raise FileNotFoundError(f"no weights (.safetensors or .bin) in {folder}")


def _json(path: str) -> dict[str, Any]:
  with open(path) as f:
    return json.load(f)


def _diffusers_parts(root: str) -> dict[str, Any]:
  required = ("unet", "vae", "text_encoder", "scheduler")
  missing = [p for p in required if not os.path.isfile(os.path.join(root, p, "config.json" if p != "scheduler"
                                                                     else "scheduler_config.json"))]
  if missing:
    raise FileNotFoundError(
        f"{root} is not a diffusers Stable Diffusion folder: missing {', '.join(m + '/' for m in missing)} "
        "(expected unet/, vae/, text_encoder/, tokenizer/, scheduler/ with config files)"
    )
  unet_fields = unet_fields_from_diffusers_config(_json(os.path.join(root, "unet", "config.json")))
  vae_json = _json(os.path.join(root, "vae", "config.json"))
  first_stage = first_stage_from_diffusers_config(vae_json)
  text_json = _json(os.path.join(root, "text_encoder", "config.json"))
  cond = dict(
      kind="clip", preset="sd_v1", **{k: text_json[k] for k in (
          "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "max_position_embeddings", "hidden_act", "layer_norm_eps") if k in text_json},
  )
  if "CLIPTextModelWithProjection" in text_json.get("architectures", []):
    cond["projection_dim"] = text_json["projection_dim"]
  scheduler = _scheduler_parts(_json(os.path.join(root, "scheduler", "scheduler_config.json")))
  state = {}
  state.update(diffusers_unet_to_original(read_component(os.path.join(root, "unet")), unet_fields,
                                          original_prefix=ldm_config.UNET_PREFIX))
  state.update(diffusers_vae_to_original(read_component(os.path.join(root, "vae")), first_stage,
                                         original_prefix=ldm_config.VAE_PREFIX))
  text = read_component(os.path.join(root, "text_encoder"))
  factor = 2 ** (len(first_stage["ddconfig"]["ch_mult"]) - 1)
  inpaint = unet_fields["in_channels"] == 2 * first_stage["embed_dim"] + 1
  tokenizer_dir = os.path.join(root, "tokenizer")
  return dict(
      unet=unet_fields, first_stage=first_stage, cond_stage=cond, concat={"kind": "inpaint"} if inpaint else None,
      ldm={}, scale_factor=float(vae_json.get("scaling_factor", 0.18215)),
      image_size=int(unet_fields["image_size"] or 64) * factor, state=state, cond_state=text,
      tokenizer=tokenizer_dir if os.path.isdir(tokenizer_dir) else None, what=root, **scheduler,
  )


def _scheduler_parts(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """Schedule, prediction type and sampler defaults of a diffusers ``scheduler_config.json``."""
  schedule: dict[str, Any] = dict(
      name=schedule_name_from_diffusers(cfg.get("beta_schedule", "linear")),
      num_timesteps=int(cfg.get("num_train_timesteps", 1000)), linear_start=float(cfg.get("beta_start", 1e-4)),
      linear_end=float(cfg.get("beta_end", 0.02)),
  )
  if cfg.get("trained_betas") is not None:
    schedule = {"betas": np.asarray(cfg["trained_betas"], np.float64)}
  prediction = cfg.get("prediction_type", "epsilon")
  if prediction not in _PREDICTION:
    raise ValueError(f"unsupported scheduler prediction_type {prediction!r}; expected one of {sorted(_PREDICTION)}")
  default_spacing = "linspace" if cfg.get("_class_name") in _LINSPACE_SCHEDULERS else "leading"
  sampler = dict(
      timestep_spacing=cfg.get("timestep_spacing") or default_spacing, steps_offset=int(cfg.get("steps_offset", 0)),
      set_alpha_to_one=bool(cfg.get("set_alpha_to_one", True)),
  )
  return dict(schedule=schedule, prediction_type=_PREDICTION[prediction], sampler_defaults=sampler)


# ----------------------------------------------------------------------------- original files

def _single_file_parts(path: str, *, use_ema: bool, config, tokenizer: str | None) -> dict[str, Any]:
  if not path.endswith(SINGLE_FILE_SUFFIXES):
    raise ValueError(f"{path}: unknown checkpoint format; expected a diffusers folder or one of {SINGLE_FILE_SUFFIXES}")
  state = read_state_dict(path)
  if config is None:
    sibling = os.path.splitext(path)[0] + ".yaml"
    config = sibling if os.path.isfile(sibling) else None
  if isinstance(config, str):
    config = ldm_config.read_yaml(config)
  if config is not None and ldm_config.is_first_stage_config(config):
    raise ValueError(f"{path} is a first-stage autoencoder, not a diffusion model: load it with "
                     "first_stage.checkpoint (ldm_jax.interop.load.load_first_stage)")
  if config is not None:
    parts = ldm_config.sections_from_ldm_config(config)
  elif any(k.startswith(ldm_config.UNET_PREFIX) for k in state):
    parts = ldm_config.sd_sections_from_state_dict(state)
  else:
    raise ValueError(f"{path} has no {ldm_config.UNET_PREFIX}* weights; a paper checkpoint needs its YAML config "
                     "(config=...)")
  if config is not None and parts["cond_stage"]["kind"] == "clip":
    # Reference configs name the encoder (ViT-L/14, ViT-H-14); its size is in the weights.
    inferred = ldm_config.clip_section_from_state_dict(state)
    parts["cond_stage"] = {**parts["cond_stage"], **inferred,
                           **{k: v for k, v in parts["cond_stage"].items() if k not in ("kind", "preset")}}
  if "scale_factor" in state and np.size(state["scale_factor"]) == 1:  # scale_by_std models store theirs
    parts["scale_factor"] = float(np.asarray(state["scale_factor"]))
  state = select_ema(state, use_ema)
  if tokenizer is None:
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer")
    tokenizer = beside if os.path.isdir(beside) else None
  return dict(parts, state=state, cond_state=None, tokenizer=tokenizer, what=path,
              sampler_defaults=dict(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False))


def ema_key(key: str) -> str:
  """The reference LitEma's name of a ``model.*`` parameter: the rest without its dots."""
  return "model_ema." + key[len("model."):].replace(".", "")


def select_ema(state: Mapping[str, Any], use_ema: bool) -> dict[str, Any]:
  """``model.diffusion_model.*`` from the EMA copy when asked and present; ``model_ema.*`` dropped."""
  has_ema = any(k.startswith("model_ema.diffusion_model") for k in state)
  out = {k: v for k, v in state.items() if not k.startswith("model_ema.")}
  if use_ema and has_ema:
    unet_keys = [k for k in out if k.startswith(ldm_config.UNET_PREFIX)]
    missing = [ema_key(k) for k in unet_keys if ema_key(k) not in state]
    if missing:
      raise naming.StateDictMismatchError(missing=missing, what="checkpoint's EMA weights (use_ema=True)")
    out.update({k: state[ema_key(k)] for k in unet_keys})
  return out


# ----------------------------------------------------------------------------- building

def assemble_pipeline(parts: dict[str, Any], *, mesh, compute_dtype: str):
  model, tok, max_length = build_from_parts(parts, compute_dtype)
  params, frozen = convert_weights(model, parts, max_length)
  return pipeline_from_parts(parts, model, tok, max_length, params, frozen, mesh)


def build_from_parts(parts: dict[str, Any], compute_dtype: str):
  """(model, tokenizer, max_length) that ``parts`` describe (no weights)."""
  tok = _load_tokenizer(parts["tokenizer"], parts["cond_stage"]["kind"])
  cond = dict(parts["cond_stage"])
  max_length = int(cond.get("max_position_embeddings", cond.get("max_seq_len", 77)))
  if tok is not None and cond["kind"] in ("clip", "text"):
    ids, mask = tokenize(tok, [""], max_length)
    n = int(mask[0].sum())
    pad = int(ids[0, -1]) if n < max_length else 0
    cond.update(empty_token_ids=tuple(int(i) for i in ids[0, :n]), pad_token_id=pad)
  model = build_latent_diffusion(
      unet=parts["unet"], first_stage=parts["first_stage"], cond_stage=cond, concat=parts["concat"],
      ldm=parts["ldm"], scale_factor=parts["scale_factor"], compute_dtype=compute_dtype,
  )
  model.check_consistency(parts["image_size"])
  return model, tok, max_length


def convert_weights(model, parts: dict[str, Any], max_length: int, *, with_unet: bool = True):
  """(params, frozen) from the parts' PyTorch state dict; every problem of every component in one error.

  ``with_unet=False`` leaves the UNet out (``params`` without ``"unet"``).
  """
  state, what = parts["state"], parts["what"]
  templates = weight_templates(model, max_length)
  errors, out = [], {}
  jobs = {
      "unet": lambda: naming.torch_to_flax(state, templates["unet"], strip_prefix=ldm_config.UNET_PREFIX, what=what),
      "first_stage": lambda: naming.torch_to_flax(
          state, templates["first_stage"], strip_prefix=ldm_config.VAE_PREFIX, ignore=(r"^loss\.",), what=what),
  }
  if "cond" in templates:
    cond_state = parts["cond_state"] if parts["cond_state"] is not None else {
        k: v for k, v in state.items() if k.startswith(ldm_config.COND_PREFIX)}
    jobs["cond"] = lambda: load_cond_stage_variables(model.cond_stage, cond_state, templates["cond"])
  if not with_unet:
    del jobs["unet"]
  if "concat" in templates:  # the reference keeps a concat encoder (SpatialRescaler) as its cond_stage_model
    jobs["concat"] = lambda: naming.torch_to_flax(state, templates["concat"], strip_prefix=ldm_config.COND_PREFIX,
                                                  what=what)
  for name, job in jobs.items():
    try:
      out[name] = job()
    except naming.StateDictMismatchError as e:
      errors.append(e)
  known = (ldm_config.UNET_PREFIX, ldm_config.VAE_PREFIX, ldm_config.COND_PREFIX)
  stray = [k for k in state if not k.startswith(known) and not _BUFFERS.match(k)]
  if parts["cond_state"] is None and "cond" not in templates and "concat" not in templates:
    stray += [k for k in state if k.startswith(ldm_config.COND_PREFIX)]
  if errors or stray:
    raise naming.StateDictMismatchError(
        [m for e in errors for m in e.missing], stray + [u for e in errors for u in e.unexpected],
        [m for e in errors for m in e.mismatched], what=what)
  return split_params_frozen(model, out)


def split_params_frozen(model, components: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """``{"unet", "first_stage", "cond"}`` variables as the pipeline's (params, frozen)."""
  params = {"unet": components["unet"]} if "unet" in components else {}
  frozen = {"first_stage": components["first_stage"]}
  if "cond" in components:
    (params if model.cond_stage.trainable else frozen)["cond"] = components["cond"]
  if "concat" in components:
    params["concat"] = components["concat"]
  return params, frozen


def pipeline_from_parts(parts: dict[str, Any], model, tok, max_length: int, params, frozen, mesh):
  sched = parts["schedule"]
  schedule = DiffusionSchedule.from_betas(sched["betas"]) if "betas" in sched else make_schedule(**sched)
  return LDMPipeline(
      model, params, frozen, schedule, tok, max_length, parts["prediction_type"], parts["image_size"], mesh,
      sampler_defaults=parts["sampler_defaults"],
  )


def weight_templates(model, max_length: int) -> dict[str, Any]:
  """Abstract variables (shapes only) of every component."""
  key = jax.random.key(0)
  out = {"unet": unet_template(model.unet, model.downsample_factor),
         "first_stage": first_stage_template(model.first_stage)}
  if model.cond_stage.module is not None:
    example = np.zeros((1,), np.int32) if model.cond_stage.kind == "class" else np.zeros((1, max_length), np.int32)
    out["cond"] = jax.eval_shape(model.cond_stage.module.init, key, example)
  if model.concat_stage is not None and model.concat_stage.trainable:
    rescaler = model.concat_stage.module
    side = 2 ** (rescaler.n_stages + 1)  # any size that survives the resizing: the 1x1 conv is what has weights
    out["concat"] = jax.eval_shape(rescaler.init, key, jax.ShapeDtypeStruct((1, side, side, rescaler.in_channels),
                                                                          np.float32))
  return out


def unet_template(unet, downsample_factor: int) -> Any:
  """Abstract UNet variables (their shapes do not depend on the input's size or context length)."""
  f = downsample_factor
  x = jax.ShapeDtypeStruct((1, 2 * f, 2 * f, unet.in_channels), np.float32)
  ctx = jax.ShapeDtypeStruct((1, 1, unet.context_dim), np.float32) if unet.context_dim else None
  y = jax.ShapeDtypeStruct((1,), np.int32) if unet.num_classes else None
  return jax.eval_shape(lambda x, c, y: unet.init(jax.random.key(0), x, np.zeros((1,), np.float32), c, y), x, ctx, y)


def first_stage_template(first_stage) -> Any:
  """Abstract encoder + decoder variables of a KL or VQ first stage."""
  def encode_decode(m, x):
    out = m.encode(x)
    return m.decode(getattr(out, "mean", out))

  f = first_stage.downsample_factor
  x = jax.ShapeDtypeStruct((1, 2 * f, 2 * f, first_stage.ddconfig.get("in_channels", 3)), np.float32)
  return jax.eval_shape(lambda x: first_stage.init(jax.random.key(0), x, method=encode_decode), x)


def _load_tokenizer(folder: str | None, kind: str):
  if folder is None or kind not in ("clip", "text"):
    return None
  from transformers import BertTokenizerFast, CLIPTokenizer

  return (CLIPTokenizer if kind == "clip" else BertTokenizerFast).from_pretrained(folder)
