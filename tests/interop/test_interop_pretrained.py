"""Loading published Stable Diffusion formats against the PyTorch reference (diffusers / transformers).

Tiny random references are saved by the test as a diffusers folder and as an
original single file (renamed with our converters, with a perturbed non-EMA
copy). Components agree within 1e-4 relative error (max |ours - ref| / max
|ref|, float32); whole text-to-image runs from the same initial latents agree
within 2e-3 absolute on [0, 1] images (we measure ~1e-5 to 1e-4).
"""

import json
import os

import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import save_file
from sd_reference import SD_V1_LIKE, SD_V2_LIKE, assert_close, diffusers, make_sd_folder, nchw, nhwc, numpy_state, torch

from ldm_jax.interop.diffusers_unet import diffusers_unet_to_original
from ldm_jax.interop.diffusers_vae import diffusers_vae_to_original, first_stage_from_diffusers_config
from ldm_jax.interop.naming import StateDictMismatchError
from ldm_jax.interop.pretrained import ema_key, load_pretrained_pipeline
from ldm_jax.models.autoencoder import AutoencoderKL

PROMPT, IMAGE_TOL = "a red cat", 2e-3


def to_single_file(pipe, folder, path, *, with_ema: bool) -> dict[str, np.ndarray]:
  """The reference pipeline as an original SD checkpoint (our converters); returns the state dict."""
  unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
  vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
  state = diffusers_unet_to_original(numpy_state(pipe.unet), unet_cfg, original_prefix="model.diffusion_model.")
  if with_ema:  # EMA copy holds the reference weights; model.* a perturbed (non-EMA) copy.
    state = {**{ema_key(k): v for k, v in state.items()}, **{k: v + 0.05 for k, v in state.items()}}
    state["model_ema.num_updates"] = np.asarray(7, np.int32)
  state.update(diffusers_vae_to_original(numpy_state(pipe.vae), first_stage_from_diffusers_config(vae_cfg),
                                         original_prefix="first_stage_model."))
  for k, v in numpy_state(pipe.text_encoder).items():
    state["cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k)] = v
  state["betas"] = np.linspace(1e-4, 2e-2, 1000, dtype=np.float32)  # a reference buffer, not a weight
  save_file(state, str(path))
  return state


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
  root = tmp_path_factory.mktemp("sd_v1")
  ref = make_sd_folder(root, SD_V1_LIKE, seed=1)
  return ref, root / "sd", load_pretrained_pipeline(str(root / "sd"))


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
  root = tmp_path_factory.mktemp("sd_v2")
  ref = make_sd_folder(root, SD_V2_LIKE, seed=11)
  return ref, root / "sd", load_pretrained_pipeline(str(root / "sd"))


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree))


def assert_same_variables(a, b):
  fa, fb = _flat(a), _flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg="/".join(k))


def check_components(ref, ours, seed):
  """UNet output, VAE encode (mean, logvar) and decode, text hidden states vs the torch pipeline."""
  rng = np.random.default_rng(seed)
  model = ours.model
  ids = ours.tokenizer([PROMPT, "cat"], padding="max_length", max_length=ours.max_length, return_tensors="np")
  ids = ids["input_ids"].astype(np.int32)
  ctx = jax.jit(model.cond_stage.encode)(ours.frozen["cond"], ids)
  with torch.no_grad():
    ref_ctx = ref.text_encoder(torch.from_numpy(ids).long())[0].numpy()
  assert_close(ctx, ref_ctx)

  z = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  t = np.asarray([17, 803], np.int32)
  eps = jax.jit(model.apply)(ours.params, z, t, {"context": np.asarray(ctx)})
  with torch.no_grad():
    ref_eps = ref.unet(nchw(z), torch.from_numpy(t).long(), encoder_hidden_states=torch.from_numpy(ref_ctx)).sample
  assert_close(eps, nhwc(ref_eps))

  x = rng.uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)
  fs, fs_vars = model.first_stage, ours.frozen["first_stage"]

  @jax.jit
  def vae(v, x, z):
    post = fs.apply(v, x, method=AutoencoderKL.encode)
    return post.mean, post.logvar, fs.apply(v, z, method=AutoencoderKL.decode)

  mean, logvar, dec = vae(fs_vars, x, z)
  with torch.no_grad():
    dist = ref.vae.encode(nchw(x)).latent_dist
    ref_dec = ref.vae.decode(nchw(z)).sample
  assert_close(mean, nhwc(dist.mean))
  assert_close(logvar, nhwc(dist.logvar))
  assert_close(dec, nhwc(ref_dec))


def test_sd_v1_folder_components_match_diffusers(v1):
  ref, _, ours = v1
  assert ours.prediction_type == "eps" and ours.image_size == 16
  assert ours.model.unet.num_heads == 8 and not ours.model.unet.use_linear_in_transformer
  assert ours.sampler_defaults == dict(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)
  assert ours.tokenizer("red")["input_ids"][1] == 53  # the merged word "red</w>"
  check_components(ref, ours, seed=0)


def test_sd_v2_folder_components_match_diffusers(v2):
  ref, _, ours = v2
  assert ours.prediction_type == "v"
  assert ours.model.unet.num_head_channels == 8 and ours.model.unet.use_linear_in_transformer
  check_components(ref, ours, seed=1)


def test_single_file_equals_folder_and_picks_ema(v1, tmp_path):
  ref, folder, ours = v1
  path = tmp_path / "sd-v1-tiny.safetensors"
  to_single_file(ref, folder, path, with_ema=True)
  (tmp_path / "tokenizer").symlink_to(folder / "tokenizer")
  single = load_pretrained_pipeline(str(path))  # no config: architecture read off the shapes
  # Architecture read off the shapes = the folder's config.json (image_size / resolution are not in the weights).
  assert single.model.unet.clone(image_size=8) == ours.model.unet
  assert single.model.cond_stage.module == ours.model.cond_stage.module
  assert single.model.concat_kind == "none" and single.model.scale_factor == ours.model.scale_factor
  assert_same_variables(single.params, ours.params)
  assert_same_variables(single.frozen, ours.frozen)
  assert single.tokenizer is not None and single.sampler_defaults == ours.sampler_defaults
  np.testing.assert_array_equal(single.schedule.alphas_cumprod, ours.schedule.alphas_cumprod)

  non_ema = load_pretrained_pipeline(str(path), use_ema=False)
  a, b = _flat(non_ema.params["unet"]), _flat(ours.params["unet"])
  np.testing.assert_allclose(a[("params", "out_2", "bias")], b[("params", "out_2", "bias")] + 0.05, atol=1e-6)


def test_single_file_with_yaml_config_v2(v2, tmp_path):
  """A v-prediction, linear-projection model in original naming, described by a reference-style YAML."""
  yaml = pytest.importorskip("yaml")
  ref, folder, ours = v2
  path = tmp_path / "v2-tiny.ckpt"
  state = to_single_file(ref, folder, tmp_path / "v2-tiny.safetensors", with_ema=False)
  torch.save({"state_dict": {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}}, str(path))
  unet = dict(image_size=8, in_channels=4, out_channels=4, model_channels=16, attention_resolutions=[2, 1],
              num_res_blocks=1, channel_mult=[1, 2], num_head_channels=8, use_spatial_transformer=True,
              use_linear_in_transformer=True, transformer_depth=1, context_dim=32, legacy=False, norm_num_groups=8,
              use_checkpoint=True)
  ddconfig = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                  num_res_blocks=1, attn_resolutions=[], dropout=0.0)
  config = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": dict(
      linear_start=0.00085, linear_end=0.012, timesteps=1000, parameterization="v", scale_factor=0.18215,
      image_size=8, conditioning_key="crossattn",
      unet_config={"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
      first_stage_config={"target": "ldm.models.autoencoder.AutoencoderKL",
                          "params": {"embed_dim": 4, "ddconfig": ddconfig, "lossconfig": {"target": "x"}}},
      cond_stage_config={"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                         "params": {"hidden_act": "gelu", "num_attention_heads": 4}},
  )}}
  (tmp_path / "v2-tiny.yaml").write_text(yaml.safe_dump(config))
  single = load_pretrained_pipeline(str(path), tokenizer=str(folder / "tokenizer"))
  assert single.prediction_type == "v" and single.model.unet == ours.model.unet
  assert_same_variables(single.params, ours.params)
  assert_same_variables(single.frozen, ours.frozen)


@pytest.mark.parametrize("sampler", ["ddim", "pndm", "dpmpp_2m"])
def test_text_to_image_matches_diffusers_pipeline(v1, sampler):
  ref, _, ours = v1
  schedulers = {
      "ddim": diffusers.DDIMScheduler, "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
      "pndm": lambda **kw: diffusers.PNDMScheduler(skip_prk_steps=True, **kw),
  }
  config = dict(ref.scheduler.config)
  ref.scheduler = schedulers[sampler].from_config(config) if sampler != "pndm" else \
      diffusers.PNDMScheduler.from_config(config, skip_prk_steps=True)
  latents = np.random.default_rng(5).normal(size=(1, 8, 8, 4)).astype(np.float32)
  with torch.no_grad():
    want = ref(PROMPT, num_inference_steps=6, guidance_scale=4.0, latents=nchw(latents), height=16, width=16,
               output_type="np").images
  got = ours.text_to_image([PROMPT], sampler=ours.sampler_config(sampler, 6), guidance_scale=4.0, x_T=latents,
                           height=16, width=16, output_type="float")
  assert got.shape == want.shape
  err = np.abs(got - want).max()
  assert err < IMAGE_TOL, f"{sampler}: max abs difference {err:.2e}"
  assert want.std() > 0.02  # a real image, not a flat one


def test_v_prediction_text_to_image_matches_diffusers(v2):
  ref, _, ours = v2
  latents = np.random.default_rng(6).normal(size=(1, 8, 8, 4)).astype(np.float32)
  with torch.no_grad():
    want = ref(PROMPT, num_inference_steps=5, guidance_scale=3.0, latents=nchw(latents), height=16, width=16,
               output_type="np").images
  got = ours.text_to_image([PROMPT], sampler=ours.sampler_config("ddim", 5), guidance_scale=3.0, x_T=latents,
                           height=16, width=16, output_type="float")
  assert np.abs(got - want).max() < IMAGE_TOL


def test_folder_without_unet_is_named(v1, tmp_path):
  _, folder, _ = v1
  for part in ("vae", "text_encoder", "scheduler", "tokenizer"):
    os.symlink(folder / part, tmp_path / part)
  with pytest.raises(FileNotFoundError, match=r"missing unet/"):
    load_pretrained_pipeline(str(tmp_path))


def test_wrong_shapes_and_strays_are_reported_together(v1, tmp_path):
  ref, folder, _ = v1
  state = to_single_file(ref, folder, tmp_path / "ok.safetensors", with_ema=False)
  bad = dict(state)
  bad["model.diffusion_model.out.2.bias"] = np.zeros((3,), np.float32)
  bad["first_stage_model.encoder.conv_in.weight"] = np.zeros((32, 3, 1, 1), np.float32)
  del bad["cond_stage_model.transformer.text_model.final_layer_norm.bias"]
  bad["model.diffusion_model.extra.weight"] = np.ones((2,), np.float32)
  bad["something_else"] = np.ones((2,), np.float32)
  save_file(bad, str(tmp_path / "bad.safetensors"))
  with pytest.raises(StateDictMismatchError) as info:
    load_pretrained_pipeline(str(tmp_path / "bad.safetensors"))
  msg = str(info.value)
  for name in ("model.diffusion_model.out.2.bias", "first_stage_model.encoder.conv_in.weight", "final_layer_norm/bias",
               "model.diffusion_model.extra.weight", "something_else"):
    assert name in msg, msg


@pytest.mark.parametrize("half", ["bfloat16", "float16"])
def test_half_precision_single_file_loads_as_float32(v1, tmp_path, half):
  """Published checkpoints are often stored in bf16/fp16: they load widened to float32 (exactly the stored values)."""
  import ml_dtypes

  ref, folder, ours = v1
  state = to_single_file(ref, folder, tmp_path / "full.safetensors", with_ema=False)
  dtype = ml_dtypes.bfloat16 if half == "bfloat16" else np.float16
  save_file({k: v.astype(dtype) if v.dtype == np.float32 else v for k, v in state.items()},
            str(tmp_path / "half.safetensors"))
  (tmp_path / "tokenizer").symlink_to(folder / "tokenizer")
  loaded = load_pretrained_pipeline(str(tmp_path / "half.safetensors"))
  for got, want in ((loaded.params, ours.params), (loaded.frozen, ours.frozen)):
    fg, fw = _flat(got), _flat(want)
    assert fg.keys() == fw.keys()
    for k in fw:
      assert fg[k].dtype == np.float32, ("/".join(k), fg[k].dtype)
      np.testing.assert_array_equal(fg[k], np.asarray(fw[k]).astype(dtype).astype(np.float32), err_msg="/".join(k))
