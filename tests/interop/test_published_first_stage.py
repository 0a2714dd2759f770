"""Starting stage 2 from published weights: first stages from every published format, the UNet's
starting weights fitted to the configured UNet (mismatches named, new input channels at zero)."""

import json

import jax
import numpy as np
import pytest
import yaml
from flax import traverse_util
from sd_reference import SD_V1_LIKE, make_sd_folder, numpy_state, torch

from ldm_jax.interop.diffusers_vae import diffusers_vae_to_original, first_stage_from_diffusers_config
from ldm_jax.interop.finetune import adapt_unet_params
from ldm_jax.interop.load import load_first_stage
from ldm_jax.interop.naming import StateDictMismatchError
from ldm_jax.interop.pretrained import load_pretrained_pipeline

safetensors_torch = pytest.importorskip("safetensors.torch")


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
  root = tmp_path_factory.mktemp("sd_fs")
  ref = make_sd_folder(root, SD_V1_LIKE, seed=5)
  folder = root / "sd"
  vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
  section = first_stage_from_diffusers_config(vae_cfg)
  original = diffusers_vae_to_original(numpy_state(ref.vae), section)
  return root, folder, section, original, load_pretrained_pipeline(str(folder)).frozen["first_stage"]


def _assert_equal_trees(got, want, atol=0.0):
  a, b = traverse_util.flatten_dict(jax.device_get(got)), traverse_util.flatten_dict(jax.device_get(want))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=0, err_msg="/".join(k))


def test_diffusers_folder_and_its_vae_folder(sd):
  _, folder, section, _, want = sd
  for path in (folder, folder / "vae"):
    model, variables, scale, model_config = load_first_stage(str(path))
    assert model_config == section and scale == pytest.approx(0.18215)
    _assert_equal_trees(variables, want)


def test_sd_single_file_in_bfloat16_is_widened(sd, tmp_path):
  _, _, _, original, want = sd
  path = tmp_path / "sd_bf16.safetensors"
  tensors = {"first_stage_model." + k: torch.from_numpy(np.ascontiguousarray(v)).to(torch.bfloat16)
             for k, v in original.items()}
  tensors["model.diffusion_model.time_embed.0.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)  # other parts
  safetensors_torch.save_file(tensors, str(path))
  _, variables, scale, _ = load_first_stage(str(path))
  assert scale == pytest.approx(0.18215)  # SD's, for a file without a YAML
  # bfloat16 keeps 8 bits of mantissa: equal to the rounded reference, within 2^-8 relative.
  leaves = traverse_util.flatten_dict(jax.device_get(variables))
  for k, v in traverse_util.flatten_dict(jax.device_get(want)).items():
    assert leaves[k].dtype == np.float32
    np.testing.assert_allclose(leaves[k], v, rtol=2**-8, atol=1e-6, err_msg="/".join(k))


def _paper_yaml(section, path, scale_factor=None):
  dd = dict(section["ddconfig"])
  dd = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dd.items()}
  model = {"target": "ldm.models.autoencoder.AutoencoderKL",
           "params": {"embed_dim": section["embed_dim"], "ddconfig": dd, "lossconfig": {"target": "torch.nn.Identity"}}}
  path.write_text(yaml.safe_dump({"model": model}))


def test_paper_first_stage_needs_and_reads_its_yaml(sd, tmp_path):
  _, _, section, original, want = sd
  folder = tmp_path / "kl-f2"
  folder.mkdir()
  state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in original.items()}
  state["loss.logvar"] = torch.zeros(())  # the reference keeps its loss in the checkpoint
  safetensors_torch.save_file(state, str(folder / "model.safetensors"))
  with pytest.raises(ValueError, match="YAML config"):
    load_first_stage(str(folder / "model.safetensors"))
  _paper_yaml(section, folder / "config.yaml")
  _, variables, scale, model_config = load_first_stage(str(folder / "model.safetensors"))
  assert scale == 1.0 and model_config["embed_dim"] == section["embed_dim"]
  _assert_equal_trees(variables, want)


def test_unknown_path_and_format_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    load_first_stage(str(tmp_path / "nowhere"))
  bad = tmp_path / "weights.txt"
  bad.write_text("x")
  with pytest.raises((ValueError, FileNotFoundError), match="weights.txt"):
    load_first_stage(str(bad))


def _tree(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return traverse_util.unflatten_dict({tuple(k.split("/")): rng.normal(size=s).astype(np.float32)
                                       for k, s in shapes.items()})


def test_unet_start_names_every_mismatch_and_grows_input_channels_with_zeros():
  loaded = _tree({"params/input_blocks_0_0/kernel": (3, 3, 4, 8), "params/out_2/kernel": (3, 3, 8, 4),
                  "params/time_embed_0/kernel": (8, 32), "params/extra/bias": (3,)})
  template = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a, np.float32), {
      "params": {"input_blocks_0_0": {"kernel": (3, 3, 9, 8)}, "out_2": {"kernel": (3, 3, 8, 4)},
                 "time_embed_0": {"kernel": (8, 64)}, "label_emb": {"embedding": (10, 8)}}},
      is_leaf=lambda x: isinstance(x, tuple))
  with pytest.raises(StateDictMismatchError) as error:
    adapt_unet_params(loaded, template, "error", "sd.safetensors")
  text = str(error.value)
  for name in ("input_blocks_0_0/kernel", "extra_in_channels='zeros'", "time_embed_0/kernel", "label_emb",
               "extra/bias", "sd.safetensors"):
    assert name in text
  fitting = jax.tree.map(lambda a: a, template)
  fitting["params"]["time_embed_0"]["kernel"] = jax.ShapeDtypeStruct((8, 32), np.float32)
  del fitting["params"]["label_emb"]
  loaded["params"].pop("extra")
  grown = adapt_unet_params(loaded, fitting, "zeros", "sd.safetensors")
  kernel = grown["params"]["input_blocks_0_0"]["kernel"]
  np.testing.assert_array_equal(kernel[:, :, :4], loaded["params"]["input_blocks_0_0"]["kernel"])
  np.testing.assert_array_equal(kernel[:, :, 4:], 0.0)
  np.testing.assert_array_equal(grown["params"]["out_2"]["kernel"], loaded["params"]["out_2"]["kernel"])
