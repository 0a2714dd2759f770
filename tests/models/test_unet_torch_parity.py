"""UNet parity with the PyTorch reference: diffusers' ResnetBlock2D and UNet2DConditionModel.

Tiny random-weight diffusers models (every weight random and non-zero, also
the ones the reference zero-initialises) are converted with
``diffusers_unet_to_original`` + ``naming.torch_to_flax``; our output must
match within 1e-4 relative error (max abs difference / max abs reference
output, float32).
"""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sd_reference import randomize_  # noqa: E402

from ldm_jax.interop import naming  # noqa: E402
from ldm_jax.interop.diffusers_unet import (  # noqa: E402
  RESNET_PARTS,
  diffusers_unet_to_original,
  original_unet_to_diffusers,
  unet_fields_from_diffusers_config,
)
from ldm_jax.models.unet import UNetModel  # noqa: E402
from ldm_jax.nn.unet_blocks import ResBlock  # noqa: E402

RTOL = 1e-4
_BASE = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
    cross_attention_dim=24, norm_num_groups=8,
)
_SD_V1_LIKE = dict(  # 1x1-conv proj_in/out; attention_head_dim is the head count; upsampler at .1.conv
    _BASE, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
)
CONFIGS = {
    "sd_v1_like": _SD_V1_LIKE,
    # Linear proj, per-level head counts with a constant head size (8), two
    # transformer blocks, upsampler at .2.conv, and class labels added to the
    # time embedding (as the SD 2 x4 upscaler's noise level).
    "sd_v2_like": dict(
        _BASE, down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=2, num_class_embeds=5,
    ),
    "inpaint_9ch": dict(_SD_V1_LIKE, in_channels=9),
}


def nchw(a: np.ndarray) -> "torch.Tensor":
  return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def assert_close(ours, ref) -> None:
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape
  err = np.abs(ours - ref).max() / np.abs(ref).max()
  assert err < RTOL, f"relative error {err:.2e} >= {RTOL:g}"


class Pair:
  """A random diffusers UNet, the same weights in our UNet, and shared inputs."""

  def __init__(self, name: str, seed: int):
    self.config = CONFIGS[name]
    self.torch_unet = diffusers.UNet2DConditionModel(**self.config).eval()
    randomize_(self.torch_unet, seed)
    self.fields = unet_fields_from_diffusers_config(dict(self.torch_unet.config))
    self.model = UNetModel(**self.fields)
    rng = np.random.default_rng(seed)
    self.x = rng.normal(size=(2, 8, 8, self.config["in_channels"])).astype(np.float32)
    self.t = rng.integers(0, 1000, size=2).astype(np.float32)
    self.ctx = rng.normal(size=(2, 5, 24)).astype(np.float32)
    self.y = rng.integers(0, 5, size=2) if "num_class_embeds" in self.config else None
    template = jax.eval_shape(self.model.init, jax.random.key(0), self.x, self.t, self.ctx, self.y)
    state_dict = {k: v.numpy() for k, v in self.torch_unet.state_dict().items()}
    self.params = naming.torch_to_flax(diffusers_unet_to_original(state_dict, self.fields), template)
    # One compile per config: a None mask and an array mask trace separately,
    # and the sd_v1_like tests always pass a mask (all True = no masking).
    self.apply = jax.jit(lambda p, ctx, mask: self.model.apply(p, self.x, self.t, ctx, self.y, mask))

  def reference(self, ctx, mask=None, torch_unet=None) -> np.ndarray:
    """The diffusers output (NHWC) on our inputs; ``torch_unet`` defaults to this pair's."""
    with torch.no_grad():
      out = (torch_unet or self.torch_unet)(
          nchw(self.x), torch.from_numpy(self.t), encoder_hidden_states=torch.from_numpy(ctx),
          class_labels=None if self.y is None else torch.from_numpy(self.y),
          encoder_attention_mask=None if mask is None else torch.from_numpy(mask.astype(np.float32)),
      ).sample
    return out.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def pairs():
  cache = {}

  def get(name: str) -> Pair:
    if name not in cache:
      cache[name] = Pair(name, seed=len(cache))
    return cache[name]

  return get


ALL_TOKENS = np.ones((2, 5), bool)
PADDED = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], bool)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unet_matches_diffusers(pairs, name):
  pair = pairs(name)
  mask = ALL_TOKENS if name == "sd_v1_like" else None
  assert_close(pair.apply(pair.params, pair.ctx, mask), pair.reference(pair.ctx))


def test_output_follows_the_context(pairs):
  pair = pairs("sd_v1_like")
  ctx2 = pair.ctx + np.random.default_rng(7).normal(size=pair.ctx.shape).astype(np.float32)
  first, second = (np.asarray(pair.apply(pair.params, c, ALL_TOKENS)) for c in (pair.ctx, ctx2))
  assert np.abs(first - second).max() > 1e-2 * np.abs(first).max()
  assert_close(second, pair.reference(ctx2))


def test_context_mask_matches_diffusers_and_hides_padding(pairs):
  pair = pairs("sd_v1_like")
  masked = np.asarray(pair.apply(pair.params, pair.ctx, PADDED))
  assert_close(masked, pair.reference(pair.ctx, PADDED))
  unmasked = np.asarray(pair.apply(pair.params, pair.ctx, ALL_TOKENS))
  assert np.abs(masked - unmasked).max() > 1e-3 * np.abs(unmasked).max()
  # Padding tokens may hold anything: the output does not change.
  ctx_new_padding = pair.ctx.copy()
  ctx_new_padding[~PADDED] = np.random.default_rng(8).normal(size=(int((~PADDED).sum()), 24)) * 10
  np.testing.assert_allclose(pair.apply(pair.params, ctx_new_padding, PADDED), masked, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_key_mapping_round_trip_is_identity(pairs, name):
  pair = pairs(name)
  state_dict = pair.torch_unet.state_dict()
  diffusers_config = dict(pair.torch_unet.config)
  original = diffusers_unet_to_original(state_dict, diffusers_config, original_prefix="model.diffusion_model.")
  assert all(k.startswith("model.diffusion_model.") for k in original)
  back = original_unet_to_diffusers(original, diffusers_config, original_prefix="model.diffusion_model.")
  assert list(back) == list(state_dict)
  assert all(back[k] is state_dict[k] for k in state_dict)


@pytest.mark.parametrize("name", ["sd_v1_like", "sd_v2_like"])
def test_our_params_export_to_diffusers(pairs, name):
  """flax_to_torch + original_unet_to_diffusers loads strictly into diffusers and computes the same."""
  pair = pairs(name)
  exported = original_unet_to_diffusers(naming.flax_to_torch(pair.params), pair.fields)
  fresh = diffusers.UNet2DConditionModel(**pair.config).eval()
  fresh.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in exported.items()}, strict=True)
  mask = ALL_TOKENS if name == "sd_v1_like" else None
  assert_close(pair.apply(pair.params, pair.ctx, mask), pair.reference(pair.ctx, torch_unet=fresh))


@pytest.mark.parametrize(
    "kind", [dict(), dict(scale_shift=True, down=True), dict(scale_shift=True, up=True)],
    ids=["channel_change", "scale_shift_down", "scale_shift_up"],
)
def test_resblock_matches_diffusers_resnet(kind):
  from diffusers.models.resnet import ResnetBlock2D

  scale_shift, up, down = kind.get("scale_shift", False), kind.get("up", False), kind.get("down", False)
  in_ch, out_ch = 16, (16 if up or down else 24)
  ref = ResnetBlock2D(
      in_channels=in_ch, out_channels=out_ch, temb_channels=32, groups=8, eps=1e-5, up=up, down=down,
      time_embedding_norm="scale_shift" if scale_shift else "default",
  ).eval()
  randomize_(ref, seed=11)
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 8, 6, in_ch)).astype(np.float32)
  emb = rng.normal(size=(2, 32)).astype(np.float32)
  with torch.no_grad():
    expected = ref(nchw(x), torch.from_numpy(emb)).permute(0, 2, 3, 1).numpy()

  block = ResBlock(out_ch, use_scale_shift_norm=scale_shift, up=up, down=down, norm_num_groups=8)
  renames = {diffusers_name: original for original, diffusers_name in RESNET_PARTS}
  state_dict = {
      renames[k.rsplit(".", 1)[0]] + "." + k.rsplit(".", 1)[1]: v.numpy() for k, v in ref.state_dict().items()
  }
  params = naming.torch_to_flax(state_dict, jax.eval_shape(block.init, jax.random.key(0), x, emb))
  assert_close(jax.jit(block.apply)(params, x, emb), expected)
