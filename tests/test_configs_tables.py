"""configs/ldm.py's variant tables: every variant loads, alone and with ``tiny``,
and its sections agree with each other (the UNet's channels with the first
stage and the concatenated condition, cross-attention with the encoder)."""

import importlib.util
import pathlib

import pytest

from ldm_jax.config import load_config
from ldm_jax.training.optim import make_optimizer

CONFIGS = pathlib.Path(__file__).parents[1] / "configs"


def _ldm_module():
  spec = importlib.util.spec_from_file_location("_test_configs_ldm", CONFIGS / "ldm.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


LDM = _ldm_module()
MODELS = [v for v in LDM.VARIANTS if v != "tiny"]


def test_every_variant_is_in_one_family_and_documented():
  names = [v for family in LDM.FAMILIES.values() for v in family.VARIANTS]
  assert len(names) == len(set(names)) == len(MODELS)
  for variant in MODELS:
    assert variant in LDM.__doc__, f"{variant} is missing from configs/ldm.py's docstring"


@pytest.mark.parametrize("suffix", ["", ",tiny"])
@pytest.mark.parametrize("variant", MODELS)
def test_variant_sections_agree(variant, suffix):
  c = load_config(f"{CONFIGS}/ldm.py:{variant}{suffix}")
  latent = c.first_stage.model.embed_dim
  extra = {"none": 0, "low_res": 3, "inpaint": 1 + latent,
           "segmentation": c.concat.rescaler.get("out_channels", 0)}[c.concat.kind]
  assert (c.unet.in_channels, c.unet.out_channels) == (latent + extra, latent)
  if c.concat.kind == "segmentation":
    assert c.concat.rescaler.in_channels == c.concat.num_seg_classes
  if c.cond_stage.kind in ("text", "class", "layout"):
    assert c.unet.use_spatial_transformer and c.unet.context_dim
    width = c.cond_stage.get("n_embed", c.cond_stage.get("embed_dim"))
    assert width in (None, c.unet.context_dim)
  assert c.concat.latent_first == (c.concat.kind == "inpaint" and variant == "inpainting_big")
  _, rate = make_optimizer(c.optim, c.train.num_steps, c.train.batch_size)  # lambda schedules need their keys
  assert float(rate(c.optim.warmup_steps)) > 0
  if suffix:
    assert c.first_stage.random_init and c.data.source == "shapes" and c.train.num_steps == 4
    assert c.optim.schedule in ("constant", "cosine")  # tiny runs take no 10k-step warm-up


def test_loading_leaves_the_tables_as_written():
  first = LDM.get_config("txt2img_kl8,tiny").to_dict()
  LDM.get_config("semantic256")
  assert LDM.get_config("txt2img_kl8,tiny").to_dict() == first
  assert LDM.FAMILIES["ldm_paper"].VARIANTS["txt2img_kl8"]["first_stage"]["model"] == "kl_f8"
  assert LDM.FAMILIES["ldm_paper"].VARIANTS["semantic256"]["concat"]["kind"] == "segmentation"
  assert LDM.FAMILIES["ldm_paper"].VARIANTS["inpainting_big"]["first_stage"]["model"] == "vq_f4_noattn"


def test_concat_section_refuses_latent_first_without_inpainting():
  assert LDM.concat_section("inpaint", latent_first=True).latent_first
  with pytest.raises(ValueError, match="latent_first applies to kind 'inpaint' only, not 'low_res'"):
    LDM.concat_section("low_res", low_res_size=16, latent_first=True)
