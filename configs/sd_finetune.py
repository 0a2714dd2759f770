"""Fine-tuning Stable Diffusion from its published weights.

  python train.py --config configs/sd_finetune.py:sd15 --workdir RUN \
      --config.pretrained.path=PATH/stable-diffusion-v1-5 \
      --config.data.source=webdataset --config.data.path='shards/{00000..00127}.tar'

Variants:

  sd15          SD 1.x at 512 px, eps-prediction
  sd21          SD 2.1 at 768 px, v-prediction (the 768-v model)
  sd2_inpaint   a 9-channel inpainting UNet grown from an SD 2.x base (512 px):
                the 5 new input channels start at zero, masks come from the data

Switches: ``lora`` trains low-rank adapters instead of every UNet weight;
``tiny`` runs on the tiny random-weight SD folder the tests write (32 px
shapes data, float32, a few steps).

``pretrained.path`` (a diffusers folder or an original single file) decides
the architecture, the first stage and its scale factor, the text encoder,
the tokenizer and the schedule (``ldm_jax/interop/finetune.py``); the
sections below only hold what fine-tuning itself chooses. The numbers and
where they come from:

- AdamW lr 1e-5, betas (0.9, 0.999), eps 1e-8, weight decay 1e-2, gradient
  clipping at 1.0, constant rate: diffusers' ``train_text_to_image.py``
  defaults and its README's example; LoRA lr 1e-4, rank 4, alpha = rank on
  to_q/to_k/to_v/to_out.0: ``train_text_to_image_lora.py``.
- EMA decay 0.9999: diffusers' ``EMAModel`` default, as the CompVis configs.
- CFG dropout 10%: SD v1.2+ / v2 model cards ("dropping of the
  text-conditioning" 10% of the time).
- bf16 compute with float32 master weights and float32 Adam moments
  (``precision.compute_dtype``), parameters fully sharded (FSDP) over the
  mesh so that SD's 860M UNet + Adam fit (see ``benchmarks/memory_report.py``).
"""

import importlib.util
import os

import ml_collections

from ldm_jax.config import parse_variants
from ldm_jax.interop.finetune import default_pretrained_config
from ldm_jax.training.lora import default_lora_config

C = ml_collections.ConfigDict
VARIANTS = ("sd15", "sd21", "sd2_inpaint", "lora", "tiny")
DEFAULT_VARIANT = "sd15"


def _ldm_configs():
  """``configs/ldm.py`` (loaded by path, as config files are)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ldm.py")
  spec = importlib.util.spec_from_file_location("_sd_finetune_ldm", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _base() -> ml_collections.ConfigDict:
  ldm = _ldm_configs()
  c = ldm.base_config()
  c.pretrained = default_pretrained_config()
  c.lora = default_lora_config()
  # Architecture sections are completed from pretrained.path at start-up.
  c.first_stage.update(checkpoint="", random_init=False, scale_factor=-1.0)
  c.data.update(source="webdataset", image_size=512, crop="center", random_flip=False, caption_key="caption")
  c.data.tokenizer.update(kind="clip", max_length=77)
  c.diffusion.update(cond_dropout=0.1, loss_type="l2", weighting="none")
  c.optim.update(name="adamw", learning_rate=1e-5, scale_lr_by_batch=False, b1=0.9, b2=0.999, eps=1e-8,
                 weight_decay=1e-2, schedule="constant", warmup_steps=0, grad_clip_norm=1.0)
  c.ema.decay = 0.9999
  c.train.update(batch_size=32, num_steps=15_000, log_every=50, checkpoint_every=1000, keep_checkpoints=3,
                 sample_every=1000)
  c.sample.update(prompts=("a photograph of an astronaut riding a horse",), guidance_scale=7.5, num_steps=50,
                  sampler="ddim")
  c.precision.compute_dtype = "bfloat16"
  c.mesh.shape = (1, -1, 1)  # FSDP over every device: parameters and Adam moments split, batch split too
  c.mesh.fsdp_min_size = 2**18
  return c


def _sd21(c) -> None:
  c.data.image_size = 768
  c.pretrained.prediction_type = "v"  # the 768-v model; a diffusers folder's scheduler says so itself


def _sd2_inpaint(c) -> None:
  c.concat.kind = "inpaint"  # UNet input [z_t, mask, masked-image latents]: diffusers' channel order
  c.pretrained.extra_in_channels = "zeros"
  c.data.conditioning.masks = "lama"  # SD-inpainting's masks: LaMa's generator (SD 2 inpainting model card)


def _lora(c) -> None:
  c.lora.update(rank=4, alpha=4.0)
  c.optim.learning_rate = 1e-4
  c.mesh.shape = (-1, 1, 1)  # adapters are small: plain data parallelism


def _tiny(c) -> None:
  c.data.update(source="shapes", image_size=32, caption_key="")
  c.data.shapes.update(num_train=32, num_validation=8, num_test=8, max_objects=1)
  c.data.tokenizer.max_length = 16
  c.precision.compute_dtype = "float32"
  c.optim.learning_rate = 1e-4 if c.lora.rank == 0 else 1e-3
  c.train.update(batch_size=8, num_steps=4, log_every=2, checkpoint_every=2, sample_every=0, progress_bar=False)
  c.sample.update(num_steps=4, prompts=("a red circle",))
  c.mesh.update(shape=(-1, 1, 1), fsdp_min_size=2**16)
  c.compilation_cache_dir = ""


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  words = parse_variants(arg, VARIANTS)
  chosen = [w for w in words if w in ("sd15", "sd21", "sd2_inpaint")]
  if len(chosen) > 1:
    raise ValueError(f"choose one model variant, got {chosen}")
  c = _base()
  variant = chosen[0] if chosen else DEFAULT_VARIANT
  if variant == "sd21":
    _sd21(c)
  elif variant == "sd2_inpaint":
    _sd2_inpaint(c)
  if "lora" in words:
    _lora(c)
  if "tiny" in words:
    _tiny(c)
  return c
