"""Export to a diffusers folder: diffusers and transformers load it with exactly the reference weights,
and load -> export -> load is exact (no tolerance: only renames, transposes and reshapes)."""

import json

import jax
import numpy as np
import pytest
from flax import traverse_util
from sd_reference import SD_V1_LIKE, SD_V2_LIKE, diffusers, make_sd_folder, numpy_state, transformers

from ldm_jax.interop.export import export_diffusers, main
from ldm_jax.interop.pretrained import load_pretrained_pipeline


def assert_same_state(got: dict, want: dict, what: str) -> None:
  assert sorted(got) == sorted(want), f"{what}: keys differ: {sorted(set(got) ^ set(want))[:10]}"
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=f"{what}: {k}")


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_export_loads_in_diffusers_with_identical_weights(variant, tmp_path):
  ref = make_sd_folder(tmp_path, SD_V1_LIKE if variant == "v1" else SD_V2_LIKE, seed=3)
  ours = load_pretrained_pipeline(str(tmp_path / "sd"))
  out = tmp_path / "exported"
  export_diffusers(ours, str(out))

  unet = diffusers.UNet2DConditionModel.from_pretrained(str(out / "unet"))
  vae = diffusers.AutoencoderKL.from_pretrained(str(out / "vae"))
  text = transformers.CLIPTextModel.from_pretrained(str(out / "text_encoder"))
  assert_same_state(numpy_state(unet), numpy_state(ref.unet), "unet")
  assert_same_state(numpy_state(vae), numpy_state(ref.vae), "vae")
  assert_same_state(numpy_state(text), numpy_state(ref.text_encoder), "text_encoder")
  for key in ("use_linear_projection", "attention_head_dim", "cross_attention_dim", "block_out_channels"):
    assert unet.config[key] == ref.unet.config[key] or list(unet.config[key]) == list(ref.unet.config[key]), key
  assert vae.config.scaling_factor == ref.vae.config.scaling_factor

  pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None, feature_extractor=None)
  for key in ("beta_schedule", "beta_start", "beta_end", "prediction_type", "steps_offset", "set_alpha_to_one",
              "timestep_spacing"):
    assert pipe.scheduler.config[key] == ref.scheduler.config[key], key
  assert pipe.tokenizer("a red cat")["input_ids"] == ref.tokenizer("a red cat")["input_ids"]

  again = load_pretrained_pipeline(str(out))
  for mine, theirs in ((again.params, ours.params), (again.frozen, ours.frozen)):
    a, b = traverse_util.flatten_dict(jax.device_get(mine)), traverse_util.flatten_dict(jax.device_get(theirs))
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg="/".join(k))
  assert again.prediction_type == ours.prediction_type and again.sampler_defaults == ours.sampler_defaults
  np.testing.assert_array_equal(again.schedule.betas, ours.schedule.betas)


def test_cli_exports_a_loadable_folder_and_reexport_is_identical(tmp_path):
  make_sd_folder(tmp_path, SD_V1_LIKE, seed=4)
  main([str(tmp_path / "sd"), str(tmp_path / "a")])
  main([str(tmp_path / "a"), str(tmp_path / "b")])
  for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
               "text_encoder/model.safetensors"):
    assert (tmp_path / "a" / part).read_bytes() == (tmp_path / "b" / part).read_bytes(), part
  for part in ("unet/config.json", "vae/config.json", "scheduler/scheduler_config.json", "model_index.json"):
    assert json.loads((tmp_path / "a" / part).read_text()) == json.loads((tmp_path / "b" / part).read_text())


def test_export_refuses_what_diffusers_cannot_hold(tmp_path):
  make_sd_folder(tmp_path, SD_V1_LIKE, seed=5)
  ours = load_pretrained_pipeline(str(tmp_path / "sd"))
  ours.model = ours.model.__class__(**{**ours.model.__dict__, "unet": ours.model.unet.clone(context_dim=None)})
  with pytest.raises(ValueError, match="only cross-attention UNets"):
    export_diffusers(ours, str(tmp_path / "out"))
