"""Starting stage 2 from published weights (fine-tuning).

``config.pretrained`` (:func:`default_pretrained_config`) names where a run
starts:

- ``path``: a published Stable Diffusion model (diffusers folder or
  original single file). :func:`start_from_pretrained` reads it once and
  completes the config from it (UNet architecture, first stage and scale
  factor, text encoder, tokenizer, schedule and prediction type, sampler
  spacing), so training and sampling use what the model was trained with;
  it returns the frozen first stage, the frozen text encoder and the UNet's
  starting weights.
- ``unet_from``: only the UNet's starting weights (a run directory or any
  checkpoint ``load_pipeline`` reads), for any stage-2 config
  (:func:`unet_init_params`).

Starting weights must fit the configured UNet: every array that differs is
named in one error, except the input convolution's extra channels, which
``extra_in_channels="zeros"`` starts at zero (how SD-inpainting grew a 4- to
a 9-channel UNet, so the model starts as the base model).
"""

import dataclasses
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from ldm_jax.assembly import FirstStageWeights, build_model
from ldm_jax.interop.load import first_stage_for
from ldm_jax.interop.naming import StateDictMismatchError
from ldm_jax.interop.pretrained import build_from_parts, convert_weights, read_parts, unet_template
from ldm_jax.interop.run_dirs import pretrained_unet
from ldm_jax.models.latent_diffusion import LatentDiffusion
from ldm_jax.training.config_check import check_pretrained_config

C = ml_collections.ConfigDict
# The UNet's input convolution: the one array whose input channels may grow.
INPUT_CONV = ("input_blocks_0_0", "kernel")


def default_pretrained_config() -> ml_collections.ConfigDict:
  """``config.pretrained``: where stage 2 starts (empty: from scratch)."""
  return C(dict(
      # A published SD model (diffusers folder, or .safetensors / .ckpt single file): architecture,
      # schedule, tokenizer, first stage, text encoder and the UNet's starting weights come from it.
      path="",
      # Only the UNet's starting weights (a run directory or a published checkpoint); "" = `path`.
      unet_from="",
      # Which UNet weights of a checkpoint that holds both: "ema" or "raw".
      weights="ema",
      # Input channels the checkpoint lacks (e.g. a 9-channel inpainting UNet from a 4-channel one):
      # "error", or "zeros" (they start at zero, so the model starts as the checkpoint's).
      extra_in_channels="error",
      # "eps" | "v" | "x0": overrides the checkpoint's (SD 2.x 768-v single files need "v"); "" = the checkpoint's.
      prediction_type="",
      # Tokenizer folder for a single file without `tokenizer/` beside it.
      tokenizer="",
  ))


@dataclasses.dataclass
class PretrainedStart:
  """What a run that starts from a published model trains with."""

  config: ml_collections.ConfigDict
  first_stage: FirstStageWeights
  cond_variables: Any
  unet_params: Any


def start_from_pretrained(config: ml_collections.ConfigDict, *, with_unet: bool = True) -> PretrainedStart:
  """Reads ``config.pretrained.path`` once: the completed config and the weights to start from.

  ``with_unet=False`` (a run resuming from its own checkpoint) skips converting
  the UNet's weights: ``unet_params`` is None.
  """
  p = config.pretrained
  check_pretrained_config(p)
  parts = read_parts(p.path, use_ema=p.weights == "ema", tokenizer=p.tokenizer or None,
                     prediction_type=p.prediction_type or None)
  if parts["cond_stage"]["kind"] != "clip" or parts["tokenizer"] is None:
    what = "a tokenizer folder (pretrained.tokenizer)" if parts["cond_stage"]["kind"] == "clip" else "a CLIP encoder"
    raise ValueError(f"{p.path}: fine-tuning a text-to-image model needs {what}")
  source_model, _, max_length = build_from_parts(parts, "float32")
  params, frozen = convert_weights(source_model, parts, max_length, with_unet=with_unet)
  own_first_stage = bool(config.first_stage.checkpoint)  # another first stage than the model's own was asked for
  config = completed_config(config, parts)
  if own_first_stage:
    first_stage = first_stage_for(config)
  else:
    first_stage = FirstStageWeights(frozen["first_stage"], parts["first_stage"], parts["scale_factor"])
  unet = None
  if with_unet and not p.unet_from:
    unet = adapt_unet_params(params["unet"], _unet_template(config, first_stage), p.extra_in_channels, p.path)
  return PretrainedStart(config, first_stage, frozen.get("cond"), unet)


def completed_config(config: ml_collections.ConfigDict, parts: dict[str, Any]) -> ml_collections.ConfigDict:
  """``config`` with everything the checkpoint decides filled in from ``parts``."""
  c = ml_collections.ConfigDict(config.to_dict())
  path = c.pretrained.path
  unet = dict(parts["unet"])
  latent = parts["first_stage"]["embed_dim"]
  if c.concat.kind == "inpaint":
    unet["in_channels"] = 2 * latent + 1
  elif c.concat.kind == "none" and (parts["concat"] or {}).get("kind") == "inpaint":
    c.concat.kind = "inpaint"  # an inpainting checkpoint stays one
  elif c.concat.kind != "none":
    raise ValueError(f"concat.kind {c.concat.kind!r} cannot start from {path}: only 'inpaint' models grow from SD")
  c.unet = C({k: v for k, v in unet.items() if v is not None})
  c.first_stage.update(checkpoint=c.first_stage.checkpoint or path, random_init=False, model=C(parts["first_stage"]))
  cond = dict(parts["cond_stage"])
  cond["checkpoint"] = os.path.join(path, "text_encoder") if os.path.isdir(path) else path
  c.cond_stage = C(cond)
  schedule = parts["schedule"]
  if "betas" in schedule:
    raise ValueError(f"{path}: a scheduler with trained_betas is not supported for training")
  c.diffusion.update(schedule=schedule["name"], timesteps=schedule["num_timesteps"],
                     linear_start=schedule["linear_start"], linear_end=schedule["linear_end"],
                     prediction_type=parts["prediction_type"])
  sampler = parts["sampler_defaults"]
  c.sample.update(timestep_spacing=sampler["timestep_spacing"], steps_offset=sampler["steps_offset"])
  c.data.tokenizer.update(kind="clip", path=parts["tokenizer"],
                          max_length=int(cond.get("max_position_embeddings", 77)))
  if not c.pretrained.unet_from:
    c.pretrained.unet_from = path
  return c


def unet_init_params(config: ml_collections.ConfigDict, model: LatentDiffusion) -> Any:
  """The UNet's starting weights from ``config.pretrained.unet_from`` (None: random)."""
  p = config.get("pretrained")
  if p is None or not p.unet_from:
    return None
  check_pretrained_config(p)
  source = p.unet_from
  loaded = pretrained_unet(source, use_ema=p.weights == "ema", prediction_type=p.prediction_type or None)
  template = unet_template(model.unet, model.downsample_factor)
  return adapt_unet_params(loaded, template, p.extra_in_channels, source)


def adapt_unet_params(loaded: Any, template: Any, extra_in_channels: str, what: str) -> Any:
  """``loaded`` UNet variables in ``template``'s shapes (float32 numpy).

  Raises ``StateDictMismatchError`` naming every array that is missing,
  unexpected or of another shape; grows the input convolution's channels
  with zeros when ``extra_in_channels == "zeros"``.
  """
  flat_loaded = _flatten(loaded)
  flat_template = _flatten(template)
  missing = sorted(set(flat_template) - set(flat_loaded))
  unexpected = sorted(set(flat_loaded) - set(flat_template))
  mismatched, out = [], {}
  for key in sorted(set(flat_template) & set(flat_loaded)):
    value, want = np.asarray(flat_loaded[key], np.float32), tuple(flat_template[key].shape)
    if value.shape != want and key[-2:] == INPUT_CONV and extra_in_channels == "zeros" \
        and value.shape[:2] + value.shape[3:] == want[:2] + want[3:] and value.shape[2] < want[2]:
      grown = np.zeros(want, np.float32)
      grown[:, :, : value.shape[2]] = value
      value = grown
    if value.shape != want:
      hint = " (pretrained.extra_in_channels='zeros' starts new input channels at zero)" \
          if key[-2:] == INPUT_CONV and extra_in_channels == "error" else ""
      mismatched.append(("/".join(key) + hint, value.shape, want))
    out[key] = value
  if missing or unexpected or mismatched:
    raise StateDictMismatchError(["/".join(k) for k in missing], ["/".join(k) for k in unexpected], mismatched,
                                 what=f"{what} (the UNet's starting weights)")
  return _unflatten(out)


def _unet_template(config: ml_collections.ConfigDict, first_stage: FirstStageWeights) -> Any:
  """Abstract variables of the UNet ``config`` trains (built by the assembly, as training builds it)."""
  model = build_model(config, first_stage.model_config, first_stage.scale_factor)
  return unet_template(model.unet, model.downsample_factor)


def _flatten(tree: Any) -> dict[tuple[str, ...], Any]:
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out[tuple(str(getattr(k, "key", k)) for k in path)] = leaf
  return out


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for key, value in flat.items():
    node = out
    for part in key[:-1]:
      node = node.setdefault(part, {})
    node[key[-1]] = value
  return out
