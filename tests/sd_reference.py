"""Tiny random-weight Stable Diffusion references (diffusers + transformers), written to disk by tests.

``make_sd_folder`` saves a ``StableDiffusionPipeline`` folder; ``to_single_file``
renames it to an original single-file checkpoint with our own converters.
"""

import json
import math

import numpy as np
import pytest
from tiny_clip_vocab import write_clip_vocab

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

MAX_LEN = 16
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    steps_offset=1, set_alpha_to_one=False, clip_sample=False, timestep_spacing="leading")
# SD v1-like: context 768 and 8 heads, as SD v1 (so a single file needs no config), conv proj_in.
SD_V1_LIKE = dict(
    unet=dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=768,
              attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    text=dict(hidden_size=768, intermediate_size=64, num_hidden_layers=2, num_attention_heads=12,
              hidden_act="quick_gelu"),
    prediction_type="epsilon",
)
# SD v2-like: linear proj_in, constant head size 8, GELU text encoder, v-prediction.
SD_V2_LIKE = dict(
    unet=dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=32,
              attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
              down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2),
    text=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, hidden_act="gelu"),
    prediction_type="v_prediction",
)
VAE = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, sample_size=16,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def randomize_(module, seed: int) -> None:
  """Every parameter random and non-zero: kernels ~ N(0, 1/fan_in), norms ~ 1 + N(0, .3²), biases ~ N(0, .3²)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim > 1:
        p.copy_(noise / math.sqrt(p[0].numel()))
      else:
        p.copy_(0.3 * noise + (1.0 if name.endswith("weight") else 0.0))


def write_tokenizer(folder) -> None:
  """A tiny CLIP BPE vocabulary (letters, a few merges), loadable by CLIPTokenizer.from_pretrained."""
  write_clip_vocab(folder)
  (folder / "tokenizer_config.json").write_text(json.dumps(dict(
      model_max_length=MAX_LEN, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
      unk_token="<|endoftext|>", pad_token="<|endoftext|>", tokenizer_class="CLIPTokenizer")))


def make_sd_folder(folder, variant: dict, seed: int):
  """A random tiny StableDiffusionPipeline saved (safetensors) to ``folder``; returns the torch pipeline."""
  torch.manual_seed(seed)
  unet = diffusers.UNet2DConditionModel(**variant["unet"]).eval()
  vae = diffusers.AutoencoderKL(**VAE).eval()
  text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=64, max_position_embeddings=MAX_LEN, attn_implementation="eager", **variant["text"])).eval()
  for i, m in enumerate((unet, vae, text)):
    randomize_(m, seed + i)
  write_tokenizer(folder / "tokenizer_src")
  tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder / "tokenizer_src"))
  scheduler = diffusers.DDIMScheduler(**SD_SCHEDULER, prediction_type=variant["prediction_type"])
  pipe = diffusers.StableDiffusionPipeline(
      vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler, safety_checker=None,
      feature_extractor=None, requires_safety_checker=False)
  pipe.save_pretrained(str(folder / "sd"), safe_serialization=True)
  pipe.set_progress_bar_config(disable=True)
  return pipe


def numpy_state(module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def nchw(a) -> "torch.Tensor":
  return torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32).transpose(0, 3, 1, 2)))


def nhwc(t) -> np.ndarray:
  return t.detach().permute(0, 2, 3, 1).numpy()


def assert_close(ours, ref, rtol: float = 1e-4) -> None:
  """max |ours - ref| <= rtol * max |ref| (float32)."""
  ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  err = np.abs(ours - ref).max() / np.abs(ref).max()
  assert err < rtol, f"relative error {err:.2e} >= {rtol:g}"
