"""Export an ``LDMPipeline`` to a diffusers Stable Diffusion folder of ``.safetensors``.

Writes ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` (when the
pipeline has one), ``scheduler/`` and ``model_index.json``, so that
``diffusers.StableDiffusionPipeline.from_pretrained(out)`` loads it and
``load_pretrained_pipeline(out)`` gives back exactly the same weights.

    python -m ldm_jax.interop.export RUN_DIR OUT_DIR [--no-ema]
    python -m ldm_jax.interop.export RUN_DIR model.safetensors --single_file   # SD 2.x: + model.yaml
    python -m ldm_jax.interop.export LORA_RUN_DIR lora.safetensors --lora

Only what the diffusers SD pipeline can express exports: a KL autoencoder, a
CLIP text encoder (or none), a UNet with spatial transformers.
"""

import argparse
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from safetensors.numpy import save_file

from ldm_jax.diffusion.schedules import make_beta_schedule
from ldm_jax.interop import naming
from ldm_jax.interop.diffusers_unet import original_unet_to_diffusers
from ldm_jax.interop.diffusers_vae import diffusers_config_from_first_stage, original_vae_to_diffusers
from ldm_jax.interop.load import load_pipeline
from ldm_jax.interop.lora_files import save_lora
from ldm_jax.interop.openclip import transformers_text_to_openclip
from ldm_jax.interop.reference_yaml import write_reference_yaml
from ldm_jax.interop.run_dirs import load_run_adapters
from ldm_jax.models.unet import UNetModel

_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
_UNET_FIELDS = ("in_channels", "out_channels", "model_channels", "channel_mult", "num_res_blocks",
                "attention_resolutions", "num_heads", "num_head_channels", "transformer_depth", "context_dim",
                "use_linear_in_transformer", "norm_num_groups", "use_scale_shift_norm", "num_classes",
                "use_spatial_transformer", "resblock_updown", "conv_resample", "image_size")


def unet_fields(unet: UNetModel) -> dict[str, Any]:
  return {k: getattr(unet, k) for k in _UNET_FIELDS}


def diffusers_unet_config(fields: Mapping[str, Any]) -> dict[str, Any]:
  """The ``UNet2DConditionModel`` config of our UNet fields (inverse of ``unet_fields_from_diffusers_config``)."""
  if not fields["use_spatial_transformer"] or fields.get("context_dim") is None:
    raise ValueError("only cross-attention UNets (use_spatial_transformer=True with a context_dim) export to diffusers")
  mc, mult = fields["model_channels"], tuple(fields["channel_mult"])
  levels = len(mult)
  attends = [2**lvl in tuple(fields["attention_resolutions"]) for lvl in range(levels)]
  channels = [mc * m for m in mult]
  if fields["num_heads"] > 0:
    heads: Any = fields["num_heads"]
  else:
    heads = [c // fields["num_head_channels"] for c in channels]
  nrb = fields["num_res_blocks"]
  config = {
      "_class_name": "UNet2DConditionModel", "sample_size": fields.get("image_size") or 64,
      "in_channels": fields["in_channels"], "out_channels": fields["out_channels"],
      "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends],
      "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)],
      "block_out_channels": channels, "layers_per_block": nrb if isinstance(nrb, int) else list(nrb),
      "cross_attention_dim": fields["context_dim"], "attention_head_dim": heads,
      "use_linear_projection": bool(fields["use_linear_in_transformer"]),
      "transformer_layers_per_block": fields["transformer_depth"], "norm_num_groups": fields["norm_num_groups"],
      "resnet_time_scale_shift": "scale_shift" if fields["use_scale_shift_norm"] else "default",
      "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "norm_eps": 1e-5,
  }
  if fields.get("num_classes"):
    config["num_class_embeds"] = fields["num_classes"]
  return config


def scheduler_config(schedule, prediction_type: str, sampler_defaults: Mapping[str, Any]) -> dict[str, Any]:
  """A ``DDIMScheduler`` config: named beta schedule when the betas are one, else ``trained_betas``."""

  betas = np.asarray(schedule.betas, np.float64)
  cfg: dict[str, Any] = {"_class_name": "DDIMScheduler", "num_train_timesteps": int(betas.size),
                         "beta_start": float(betas[0]), "beta_end": float(betas[-1]), "trained_betas": None}
  for ours, theirs in (("linear", "scaled_linear"), ("sqrt_linear", "linear")):
    # Shortest decimals of the float32 ends: 0.00085, not 0.0008500000112690032.
    start, end = float(str(np.float32(betas[0]))), float(str(np.float32(betas[-1])))
    if np.allclose(make_beta_schedule(ours, betas.size, start, end), betas, rtol=1e-6, atol=0):
      cfg.update(beta_schedule=theirs, beta_start=start, beta_end=end)
      break
  else:
    cfg.update(beta_schedule="linear", trained_betas=betas.tolist())
  defaults = {"timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False, **sampler_defaults}
  cfg.update(prediction_type=_PREDICTION[prediction_type], clip_sample=False,
             **{k: defaults[k] for k in ("timestep_spacing", "steps_offset", "set_alpha_to_one")})
  return cfg


def text_encoder_files(module, variables) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(config.json, state dict) of a transformers ``CLIPTextModel`` for our CLIP encoder.

  A penultimate-layer encoder (SD 2.x) is written as diffusers does: without
  its last layer, read at the last layer.
  """
  hp = module.hyperparameters()
  layers = hp["num_hidden_layers"]
  state = naming.flax_to_torch(variables)
  if hp["output_layer"] == "penultimate":
    layers -= 1
    state = {k: v for k, v in state.items() if not k.startswith(f"text_model.encoder.layers.{layers}.")}
  with_projection = hp["projection_dim"] is not None
  config = {
      "architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
      "model_type": "clip_text_model", "num_hidden_layers": layers, "projection_dim": hp["projection_dim"] or 768,
      **{k: hp[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                            "max_position_embeddings", "hidden_act", "layer_norm_eps")},
  }
  return config, state


def export_diffusers(pipeline, out_dir: str) -> None:
  """Writes ``pipeline`` (an ``LDMPipeline``) as a diffusers Stable Diffusion folder."""
  model = pipeline.model
  if model.first_stage.__class__.__name__ != "AutoencoderKL":
    raise ValueError("diffusers' Stable Diffusion pipeline needs a KL autoencoder; this model has a "
                     f"{type(model.first_stage).__name__}")
  if model.inpaint_latent_first:
    raise ValueError("diffusers' inpainting pipeline wants [z_t, mask, masked latent]; this model takes the paper's "
                     "[z_t, masked latent, mask] order")
  if model.cond_stage.kind not in ("clip", "none"):
    raise ValueError(f"only CLIP text encoders export to diffusers, not cond_stage kind {model.cond_stage.kind!r}")
  fields = unet_fields(model.unet)
  unet_cfg = diffusers_unet_config(fields)
  fs = model.first_stage
  section = {"kind": "kl", "embed_dim": fs.embed_dim, "ddconfig": dict(fs.ddconfig)}
  params, frozen = jax.device_get(pipeline.params), jax.device_get(pipeline.frozen)

  def write(sub: str, config: Mapping[str, Any], state: Mapping[str, np.ndarray], weights: str, name: str) -> None:
    os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    with open(os.path.join(out_dir, sub, name), "w") as f:
      json.dump(config, f, indent=2)
    if state is not None:
      save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}, os.path.join(out_dir, sub, weights))

  write("unet", unet_cfg, original_unet_to_diffusers(naming.flax_to_torch(params["unet"]), fields),
        "diffusion_pytorch_model.safetensors", "config.json")
  write("vae", diffusers_config_from_first_stage(section, model.scale_factor),
        original_vae_to_diffusers(naming.flax_to_torch(frozen["first_stage"]), section),
        "diffusion_pytorch_model.safetensors", "config.json")
  write("scheduler", scheduler_config(pipeline.schedule, pipeline.prediction_type, pipeline.sampler_defaults),
        None, "", "scheduler_config.json")
  index = {
      "_class_name": "StableDiffusionInpaintPipeline" if model.concat_kind == "inpaint" else "StableDiffusionPipeline",
      "_diffusers_version": "0.30.0", "unet": ["diffusers", "UNet2DConditionModel"],
      "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"],
      "text_encoder": [None, None], "tokenizer": [None, None], "safety_checker": [None, None],
      "feature_extractor": [None, None], "requires_safety_checker": False,
  }
  if model.cond_stage.kind == "clip":
    text_cfg, text_state = text_encoder_files(model.cond_stage.module, frozen["cond"])
    write("text_encoder", text_cfg, text_state, "model.safetensors", "config.json")
    index["text_encoder"] = ["transformers", text_cfg["architectures"][0]]
  if pipeline.tokenizer is not None:
    pipeline.tokenizer.save_pretrained(os.path.join(out_dir, "tokenizer"))
    index["tokenizer"] = ["transformers", type(pipeline.tokenizer).__name__.removesuffix("Fast")]
  with open(os.path.join(out_dir, "model_index.json"), "w") as f:
    json.dump(index, f, indent=2)


def export_single_file(pipeline, path: str) -> None:
  """Writes ``pipeline`` as an original Stable Diffusion ``.safetensors`` file.

  Keys as the CompVis / Stability checkpoints have them
  (``model.diffusion_model.*``, ``first_stage_model.*``), so the original
  scripts, diffusers' ``from_single_file`` and ``load_pretrained_pipeline``
  read it. The text encoder decides the layout: CLIP ViT-L/14 style (QuickGELU,
  last layer) as SD 1.x (``cond_stage_model.transformer.text_model.*``); GELU
  encoders as SD 2.x's OpenCLIP tower (``cond_stage_model.model.*``), read at
  its penultimate layer, with the reference YAML written beside the file
  (``<stem>.yaml``: the weights do not say eps or v).
  """
  if not path.endswith(".safetensors"):
    raise ValueError(f"{path}: single-file exports are .safetensors")
  model = pipeline.model
  if model.cond_stage.kind != "clip":
    raise ValueError(f"only CLIP-conditioned models export to a Stable Diffusion file, not cond_stage kind "
                     f"{model.cond_stage.kind!r}")
  hp = model.cond_stage.module.hyperparameters()
  params, frozen = jax.device_get(pipeline.params), jax.device_get(pipeline.frozen)
  state = {}
  for prefix, variables in (("model.diffusion_model.", params["unet"]), ("first_stage_model.", frozen["first_stage"])):
    state.update({prefix + k: v for k, v in naming.flax_to_torch(variables).items()})
  text = naming.flax_to_torch(frozen["cond"])
  if hp["hidden_act"] == "quick_gelu" and hp["output_layer"] == "last" and hp["projection_dim"] is None:
    state.update({"cond_stage_model.transformer." + k: v for k, v in text.items()})
    config_path = None
  elif hp["hidden_act"] == "gelu":
    state.update(transformers_text_to_openclip(_penultimate_layout(text, hp), prefix="cond_stage_model.model."))
    config_path = os.path.splitext(path)[0] + ".yaml"
  else:
    raise ValueError(f"a CLIP text encoder with hidden_act={hp['hidden_act']!r}, output_layer="
                     f"{hp['output_layer']!r}, projection_dim={hp['projection_dim']} is neither SD 1.x's nor "
                     "SD 2.x's: export it as a diffusers folder (export_diffusers)")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}, path)
  if config_path:
    heads = {} if hp["hidden_size"] // 64 == hp["num_attention_heads"] else \
        {"num_attention_heads": hp["num_attention_heads"]}  # our loader's key; SD 2's 16 heads are implied
    write_reference_yaml(pipeline, config_path, clip_params={"freeze": True, "layer": "penultimate", **heads})


def _penultimate_layout(text: Mapping[str, np.ndarray], hp: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """A CLIP text model read at its last layer as one read at its penultimate (SD 2.x's layout).

  diffusers' SD 2.x encoder is OpenCLIP's first 23 of 24 blocks read at the
  last; the original file holds all 24 and reads the output of the 23rd. The
  24th block is never run, so it is written as zeros.
  """
  if hp["output_layer"] == "penultimate":
    return dict(text)
  layers = hp["num_hidden_layers"]
  unused = {k.replace(".layers.0.", f".layers.{layers}."): np.zeros_like(v)
            for k, v in text.items() if k.startswith("text_model.encoder.layers.0.")}
  return {**text, **unused}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("checkpoint", help="a run directory (or any checkpoint load_pipeline accepts)")
  parser.add_argument("out", help="diffusers folder to write (a .safetensors file with --single_file or --lora)")
  parser.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA ones")
  parser.add_argument("--single_file", action="store_true",
                      help="an original SD .safetensors file (SD 2.x: with its .yaml)")
  parser.add_argument("--lora", action="store_true",
                      help="a LoRA run's adapters only, in the layout diffusers' load_lora_weights reads")
  args = parser.parse_args(argv)

  if args.lora:
    config, adapters, unet = load_run_adapters(args.checkpoint, use_ema=not args.no_ema)
    print(f"wrote {save_lora(args.out, config, unet, unet=adapters)}")
    return
  pipeline = load_pipeline(args.checkpoint, use_ema=not args.no_ema)
  if args.single_file:
    export_single_file(pipeline, args.out)
  else:
    export_diffusers(pipeline, args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
