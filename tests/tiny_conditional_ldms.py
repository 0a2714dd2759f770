"""Tiny random-weight latent diffusion models of every conditioning kind, written as
``ldm_jax.interop.orbax_format`` folders that ``load_pipeline`` / ``sample.py --checkpoint`` read.

Shared by the sample.py and evaluate.py task tests: the same folder description gives the same
model, so their compiled sampling programs are shared through the persistent compilation cache.
Weights are random everywhere (no zero-initialised output convolutions), so every input reaches
the output.
"""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from ldm_jax.interop import orbax_format, pretrained

SIZE = 32  # training image size; latents are SIZE / 4 with 3 channels
LATENT = SIZE // 4
SEG_CLASSES = 5
NUM_CLASSES = 5  # class-conditional: labels 0..4 (4 is the null class)
LAYOUT = dict(kind="layout", n_embed=32, n_layer=1, heads=2, dim_head=16, vocab_size=32, max_seq_len=11,
              num_classes=10, grid_size=4, max_objects=3)

FIRST_STAGE = {"kind": "kl", "embed_dim": 3, "ddconfig": dict(
    double_z=True, z_channels=3, resolution=SIZE, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2],
    num_res_blocks=1, attn_resolutions=[], dropout=0.0)}
UNET = dict(image_size=LATENT, out_channels=3, model_channels=32, attention_resolutions=[2], num_res_blocks=1,
            channel_mult=[1, 2], num_head_channels=16)
CROSSATTN = dict(use_spatial_transformer=True, transformer_depth=1, context_dim=32)

KINDS = {
    # name: (cond_stage, concat, extra UNet fields, UNet input channels)
    "super_resolution": ({"kind": "none"}, {"kind": "low_res", "low_res_size": LATENT, "rescaler": {"n_stages": 0}},
                         {}, 6),
    "inpainting": ({"kind": "none"}, {"kind": "inpaint", "latent_first": True}, {}, 7),
    "semantic": ({"kind": "none"}, {"kind": "segmentation", "num_seg_classes": SEG_CLASSES, "rescaler": dict(
        n_stages=2, in_channels=SEG_CLASSES, out_channels=3, multiplier=0.5)}, {}, 6),
    "layout": (LAYOUT, None, CROSSATTN, 3),
    "class": ({"kind": "class", "embed_dim": 32, "n_classes": NUM_CLASSES}, None, CROSSATTN, 3),
}


def parts(kind: str) -> dict:
  cond, concat, unet_extra, in_channels = KINDS[kind]
  return dict(
      unet={**UNET, **unet_extra, "in_channels": in_channels}, first_stage=FIRST_STAGE, cond_stage=cond, concat=concat,
      ldm={}, scale_factor=1.0, prediction_type="eps", image_size=SIZE,
      schedule=dict(name="linear", num_timesteps=1000, linear_start=0.0015, linear_end=0.0195),
      sampler_defaults=dict(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False),
  )


def random_weights(templates, seed: int):
  """He-scaled random kernels and embeddings, unit norms, small random biases."""
  rng = np.random.default_rng(seed)

  def init(path, s):
    name = path[-1].key
    if name == "kernel":
      return (rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)
    if name == "scale":
      return np.ones(s.shape, np.float32)
    if name == "embedding":
      return rng.normal(size=s.shape).astype(np.float32)
    return (0.1 * rng.normal(size=s.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(init, templates)


def write_pipeline(root, kind: str, seed: int = 0) -> str:
  """Writes the ``kind`` model as an orbax pipeline folder under ``root``; returns its path."""
  out = os.path.join(str(root), kind)
  description = parts(kind)
  model, _, max_length = pretrained.build_from_parts({**description, "tokenizer": None}, "float32")
  params, frozen = pretrained.split_params_frozen(
      model, random_weights(pretrained.weight_templates(model, max_length), seed))
  os.makedirs(out)
  with open(os.path.join(out, orbax_format.DESCRIPTION_FILE), "w") as f:
    json.dump({"format": "ldm_jax.orbax_pipeline", "version": orbax_format.FORMAT_VERSION, "source": "random",
               "parts": description}, f)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(out, "weights"), {"params": params, "frozen": frozen})
  return out
