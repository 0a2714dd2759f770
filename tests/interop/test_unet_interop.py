"""Full-size UNets against the reference state dicts, and the diffusers name/config mapping.

Everything here is shapes only (``jax.eval_shape``, diffusers models on the
``meta`` device): nothing full-size is allocated.
"""

import dataclasses
import pathlib
import re

import jax
import numpy as np
import pytest

from ldm_jax.interop import naming
from ldm_jax.interop.diffusers_unet import (
    diffusers_unet_to_original,
    original_unet_to_diffusers,
    unet_fields_from_diffusers_config,
)
from ldm_jax.models.unet import UNetModel, unet_preset

PREFIX = "model.diffusion_model."
KEYS_FILE = pathlib.Path(__file__).parents[1] / "fixtures" / "sd_v1_state_dict_keys.txt"

# The published diffusers unet/config.json of SD v1.5 and SD v2.1.
SD_V1_DIFFUSERS = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD_V2_DIFFUSERS = {
    **SD_V1_DIFFUSERS, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
    "dual_cross_attention": False,
    "sample_size": 96, "upcast_attention": True, "use_linear_projection": True,
}


def reference_sd_v1_unet() -> tuple[dict[str, tuple[int, ...]], float]:
  """(key -> shape, total millions) of the original SD v1 UNet, from the reference key list."""
  text = KEYS_FILE.read_text()
  shapes = {
      m.group(1): tuple(int(d) for d in m.group(2).split(","))
      for m in re.finditer(rf"^({re.escape(PREFIX)}\S+) \[([\d, ]+)\]$", text, re.M)
  }
  total = float(re.search(r"^UNet keys \d+ params ([\d.]+)M", text, re.M).group(1))
  return shapes, total


def torch_shapes_of(fields, context_len=77) -> dict[str, tuple[int, ...]]:
  model = UNetModel(**fields)
  ctx = np.zeros((1, context_len, fields["context_dim"]), np.float32) if fields.get("context_dim") else None
  x = np.zeros((1, 64, 64, fields["in_channels"]), np.float32)
  y = np.zeros((1,), np.int32) if fields.get("num_classes") else None
  template = jax.eval_shape(model.init, jax.random.key(0), x, np.zeros((1,), np.float32), ctx, y)
  return naming.torch_shapes(template, add_prefix=PREFIX)


@pytest.fixture(scope="module")
def sd_v1_shapes():
  return torch_shapes_of(unet_preset("sd_v1"))


@pytest.fixture(scope="module")
def sd_v2_shapes():
  return torch_shapes_of(unet_preset("sd_v2"))


def millions(shapes) -> float:
  return sum(int(np.prod(s)) for s in shapes.values()) / 1e6


def test_sd_v1_matches_the_reference_state_dict_exactly(sd_v1_shapes):
  reference, total = reference_sd_v1_unet()
  assert len(reference) == 686
  assert sd_v1_shapes == reference
  assert round(millions(sd_v1_shapes), 2) == total == 859.52


def test_sd_v2_parameters(sd_v2_shapes):
  assert len(sd_v2_shapes) == 686
  assert round(millions(sd_v2_shapes), 2) == 865.91  # the SD 2 UNet's published size
  block = PREFIX + "input_blocks.1.1."
  assert sd_v2_shapes[block + "proj_in.weight"] == (320, 320)  # Linear, not a 1x1 conv
  assert sd_v2_shapes[block + "proj_out.weight"] == (320, 320)
  assert sd_v2_shapes[block + "transformer_blocks.0.attn2.to_k.weight"] == (320, 1024)
  assert sd_v2_shapes[PREFIX + "middle_block.1.transformer_blocks.0.attn1.to_q.weight"] == (1280, 1280)


def with_defaults(fields) -> dict:
  """All UNetModel fields (defaults filled in), ignoring the unused image_size."""
  defaults = {
      f.name: f.default for f in dataclasses.fields(UNetModel)
      if f.default is not dataclasses.MISSING and f.name not in ("parent", "name")
  }
  return {**defaults, **fields, "image_size": None}


@pytest.mark.parametrize("config,preset", [(SD_V1_DIFFUSERS, "sd_v1"), (SD_V2_DIFFUSERS, "sd_v2")])
def test_diffusers_configs_give_the_presets(config, preset):
  assert with_defaults(unet_fields_from_diffusers_config(config)) == with_defaults(unet_preset(preset))


@pytest.mark.parametrize("config", [SD_V1_DIFFUSERS, SD_V2_DIFFUSERS], ids=["sd_v1", "sd_v2"])
def test_full_size_key_maps_match_diffusers(config, sd_v1_shapes, sd_v2_shapes):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  with torch.device("meta"):
    reference = diffusers.UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
  expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
  ours = sd_v1_shapes if config is SD_V1_DIFFUSERS else sd_v2_shapes
  assert original_unet_to_diffusers(ours, config, original_prefix=PREFIX) == expected
  assert diffusers_unet_to_original(expected, config, original_prefix=PREFIX) == ours


def test_scale_shift_and_class_embeddings_map_onto_diffusers():
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  config = dict(
      SD_V1_DIFFUSERS, block_out_channels=[32, 64], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
      up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=[1, 2], cross_attention_dim=16,
      norm_num_groups=8, resnet_time_scale_shift="scale_shift", num_class_embeds=10,
  )
  fields = unet_fields_from_diffusers_config(config)
  assert fields["use_scale_shift_norm"] and fields["num_classes"] == 10 and fields["num_res_blocks"] == (1, 2)
  with torch.device("meta"):
    reference = diffusers.UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
  ours = torch_shapes_of(fields, context_len=3)
  assert ours[PREFIX + "input_blocks.1.0.emb_layers.1.weight"] == (64, 128)  # scale and shift: 2 x 32
  expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
  assert original_unet_to_diffusers(ours, fields, original_prefix=PREFIX) == expected


def test_unsupported_diffusers_options_are_all_named():
  config = dict(
      SD_V1_DIFFUSERS, down_block_types=["AttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "DownBlock2D"],
      class_embed_type="timestep", time_cond_proj_dim=8, norm_eps=1e-6, attention_head_dim=[4, 6, 7, 8],
      addition_embed_type="text_time", some_new_option=1,
  )
  with pytest.raises(ValueError) as error:
    unet_fields_from_diffusers_config(config)
  for name in ("AttnDownBlock2D", "up_block_types", "class_embed_type", "time_cond_proj_dim", "norm_eps",
               "attention_head_dim", "addition_embed_type", "some_new_option"):
    assert name in str(error.value), name


def test_keys_outside_the_architecture_are_reported():
  shapes = {"input_blocks.1.0.in_layers.0.weight": (320,), "input_blocks.9.7.weight": (1,), "ema.decay": ()}
  with pytest.raises(naming.StateDictMismatchError) as error:
    original_unet_to_diffusers(shapes, unet_preset("sd_v1"))
  assert error.value.unexpected == ["input_blocks.9.7.weight", "ema.decay"]
  assert "input_blocks.9.7.weight" in str(error.value)


@pytest.mark.parametrize("preset", ["celebahq_vq4", "lsun_churches_kl8"])
def test_architectures_without_a_diffusers_equivalent_are_refused(preset):
  with pytest.raises(ValueError, match="UNet2DConditionModel has no equivalent"):
    original_unet_to_diffusers({}, unet_preset(preset))
