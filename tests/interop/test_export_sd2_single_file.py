"""SD 2.x to an original single file: OpenCLIP text tower, penultimate layer, and the YAML beside it.

A tiny random SD 2.x-like diffusers folder (GELU text encoder read at its
last layer, v-prediction, linear projections) is loaded, exported with
``export_single_file`` and read back by ``load_pretrained_pipeline``: UNet and
autoencoder weights and the schedule come back bit for bit, the text encoder
(one more, unused, block and read at the penultimate layer, as SD 2 files
are) gives the same context to 1e-6, and the UNet's v-prediction survives
through the YAML.
"""

import dataclasses

import jax
import numpy as np
import pytest
import yaml
from flax import traverse_util
from safetensors.numpy import load_file
from sd_reference import SD_V1_LIKE, SD_V2_LIKE, make_sd_folder

from ldm_jax.interop.export import export_single_file
from ldm_jax.interop.ldm_config import sections_from_ldm_config
from ldm_jax.interop.pretrained import load_pretrained_pipeline
from ldm_jax.interop.reference_yaml import reference_config


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
  root = tmp_path_factory.mktemp("sd_v2_export")
  make_sd_folder(root, SD_V2_LIKE, seed=5)
  return root / "sd", load_pretrained_pipeline(str(root / "sd"))


def _assert_same(a, b):
  fa, fb = traverse_util.flatten_dict(jax.device_get(a)), traverse_util.flatten_dict(jax.device_get(b))
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg="/".join(k))


def test_sd2_single_file_reads_back_as_the_same_model(v2, tmp_path):
  folder, ours = v2
  path = tmp_path / "sd2-tiny.safetensors"
  export_single_file(ours, str(path))

  state = load_file(str(path))
  layers = ours.model.cond_stage.module.num_hidden_layers
  assert f"cond_stage_model.model.transformer.resblocks.{layers}.attn.in_proj_weight" in state  # the unused block
  assert not any(k.startswith("cond_stage_model.transformer.") for k in state)
  config = yaml.safe_load((tmp_path / "sd2-tiny.yaml").read_text())["model"]["params"]
  assert config["parameterization"] == "v" and config["linear_start"] == 0.00085 and config["linear_end"] == 0.012
  assert config["cond_stage_config"]["params"]["layer"] == "penultimate"

  back = load_pretrained_pipeline(str(path), tokenizer=str(folder / "tokenizer"))
  assert back.prediction_type == "v" and back.model.unet == ours.model.unet
  assert back.model.scale_factor == ours.model.scale_factor and back.image_size == ours.image_size
  _assert_same(back.params, ours.params)
  _assert_same(back.frozen["first_stage"], ours.frozen["first_stage"])
  np.testing.assert_array_equal(back.schedule.alphas_cumprod, ours.schedule.alphas_cumprod)

  module = back.model.cond_stage.module
  assert module.num_hidden_layers == layers + 1 and module.output_layer == "penultimate"
  ids = ours.tokenizer(["a red cat", "cat"], padding="max_length", max_length=ours.max_length,
                       return_tensors="np")["input_ids"].astype(np.int32)
  ours_ctx = jax.jit(ours.model.cond_stage.encode)(ours.frozen["cond"], ids)
  back_ctx = jax.jit(back.model.cond_stage.encode)(back.frozen["cond"], ids)
  np.testing.assert_allclose(back_ctx, ours_ctx, atol=1e-6, rtol=0)


def test_sd1_style_text_encoder_keeps_the_v1_layout(tmp_path_factory):
  root = tmp_path_factory.mktemp("sd_v1_export")
  make_sd_folder(root, SD_V1_LIKE, seed=6)
  path = root / "sd1.safetensors"
  export_single_file(load_pretrained_pipeline(str(root / "sd")), str(path))
  assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in load_file(str(path)))
  assert not (root / "sd1.yaml").exists()


def test_inpainting_models_get_the_reference_inpainting_config(v2):
  _, ours = v2
  inpaint = dataclasses.replace(ours, model=dataclasses.replace(ours.model, concat_kind="inpaint"))
  config = reference_config(inpaint)
  assert config["model"]["target"].endswith("LatentInpaintDiffusion")
  sections = sections_from_ldm_config(config)  # what the loader makes of it
  assert sections["concat"] == {"kind": "inpaint"} and sections["prediction_type"] == "v"
  assert sections["unet"]["use_linear_in_transformer"] and sections["scale_factor"] == ours.model.scale_factor
  paper_order = dataclasses.replace(ours.model, concat_kind="inpaint", inpaint_latent_first=True)
  with pytest.raises(ValueError, match="masked latent, mask"):
    reference_config(dataclasses.replace(ours, model=paper_order))
