"""The paper's unconditional and concat-conditioned LDMs from their reference YAML + original-naming
weights: unconditional (CelebA-HQ / FFHQ / LSUN style), inpainting (``__is_first_stage__``: the
masked image's latent, then the mask), semantic synthesis (a SpatialRescaler as ``cond_stage_model``, ``concat_mode``
left to the reference default) and super-resolution (``torch.nn.Identity``:
the low-res image at latent size). Tiny random weights in the reference's
key names (``cond_stage_model.channel_mapper.weight``, ...) are written by the
test and must load exactly."""

import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import save_file

from ldm_jax.interop import ldm_config, naming, pretrained

yaml = pytest.importorskip("yaml")

UNET = dict(image_size=8, in_channels=6, out_channels=3, model_channels=32, attention_resolutions=[2],
            num_res_blocks=1, channel_mult=[1, 2], num_head_channels=16)
DDCONFIG = dict(double_z=True, z_channels=3, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2],
                num_res_blocks=1, attn_resolutions=[], dropout=0.0)
COND = {
    "semantic": {"target": "ldm.modules.encoders.modules.SpatialRescaler",
                 "params": {"n_stages": 2, "in_channels": 5, "out_channels": 3}},
    "super_resolution": {"target": "torch.nn.Identity"},
    "unconditional": "__is_unconditional__",
    "inpainting": "__is_first_stage__",
}
IN_CHANNELS = {"semantic": 6, "super_resolution": 6, "unconditional": 3, "inpainting": 7}


def reference_config(kind: str) -> dict:
  return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": dict(
      linear_start=0.0015, linear_end=0.0205, timesteps=1000, image_size=8, channels=3, scale_factor=1.0,
      cond_stage_key="segmentation" if kind == "semantic" else "LR_image", cond_stage_trainable=kind == "semantic",
      unet_config={"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                   "params": {**UNET, "in_channels": IN_CHANNELS[kind]}},
      first_stage_config={"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
          "embed_dim": 3, "ddconfig": DDCONFIG, "lossconfig": {"target": "torch.nn.Identity"}}},
      cond_stage_config=COND[kind])}}


@pytest.mark.parametrize("kind", sorted(COND))
def test_concat_ldm_loads_from_yaml_and_reference_names(kind, tmp_path):
  config = reference_config(kind)
  sections = ldm_config.sections_from_ldm_config(config)
  model, _, max_length = pretrained.build_from_parts({**sections, "tokenizer": None}, "float32")
  rng = np.random.default_rng(0)
  components = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32),
                            pretrained.weight_templates(model, max_length))
  state = {**naming.flax_to_torch(components["unet"], add_prefix=ldm_config.UNET_PREFIX),
           **naming.flax_to_torch(components["first_stage"], add_prefix=ldm_config.VAE_PREFIX)}
  if kind == "semantic":
    assert model.concat_kind == "segmentation" and model.num_seg_classes == 5
    concat = naming.flax_to_torch(components["concat"], add_prefix=ldm_config.COND_PREFIX)
    assert {k: v.shape for k, v in concat.items()} == {"cond_stage_model.channel_mapper.weight": (3, 5, 1, 1)}
    state.update(concat)
  elif kind == "super_resolution":
    assert model.concat_kind == "low_res" and model.low_res_size == 8 and "concat" not in components
  elif kind == "inpainting":
    assert model.concat_kind == "inpaint" and model.inpaint_latent_first and "concat" not in components
  else:
    assert model.concat_kind == "none" and model.cond_stage.kind == "none" and "concat" not in components
  path = tmp_path / f"{kind}.safetensors"
  save_file(state, str(path))
  (tmp_path / f"{kind}.yaml").write_text(yaml.safe_dump(config))

  pipe = pretrained.load_pretrained_pipeline(str(path))
  assert pipe.model.concat_kind == model.concat_kind and pipe.image_size == 32
  want = {"unet": components["unet"], **({"concat": components["concat"]} if "concat" in components else {})}
  for got, expected in ((pipe.params, want), (pipe.frozen, {"first_stage": components["first_stage"]})):
    fg, fe = traverse_util.flatten_dict(jax.device_get(got)), traverse_util.flatten_dict(expected)
    assert fg.keys() == fe.keys()
    for k in fe:
      np.testing.assert_array_equal(fg[k], fe[k], err_msg="/".join(k))


def test_paper_inpainting_concatenates_masked_latent_then_mask():
  sections = ldm_config.sections_from_ldm_config(reference_config("inpainting"))
  model, _, max_length = pretrained.build_from_parts({**sections, "tokenizer": None}, "float32")
  rng = np.random.default_rng(1)
  frozen = {"first_stage": jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32),
                                        pretrained.weight_templates(model, max_length)["first_stage"])}
  image = rng.uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
  mask = (rng.uniform(size=(1, 32, 32, 1)) > 0.5).astype(np.float32)
  inputs = {"masked_image": image * (1 - mask), "mask": mask}
  concat = np.asarray(jax.jit(lambda f, i: model.encode_cond({}, f, i)["concat"])(frozen, inputs))
  latent = np.asarray(jax.jit(model.encode_images)(frozen, inputs["masked_image"]))
  np.testing.assert_allclose(concat[..., :3], latent, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(concat[..., 3], mask[0, ::4, ::4, 0][None])  # nearest: every 4th pixel from 0
