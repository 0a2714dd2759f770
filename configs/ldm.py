"""Stage 2: latent diffusion models.

  python train.py --config configs/ldm.py:VARIANT[,tiny] --workdir RUN \
      --config.first_stage.checkpoint=STAGE1_RUN

Variants (reference hyper-parameters of CompVis/latent-diffusion and SD):

  shapes_txt2img      text-to-image on the built-in shapes dataset (the demo)
  shapes_class        class-conditional (colour x shape) on shapes
  shapes_layout       layout-to-image (boxes + labels) on shapes
  shapes_semantic     semantic synthesis from segmentation maps on shapes
  shapes_sr           4x super-resolution on shapes
  shapes_inpaint      inpainting (mask + masked image) on shapes
  celebahq_vq4 ffhq_vq4 lsun_bedrooms_vq4   unconditional, VQ-f4 (paper)
  lsun_churches_kl8   unconditional, KL-f8, scale-shift norm, resblock up/down
  cin256_v2           ImageNet class-conditional (cross-attention), VQ-f4
  txt2img_kl8         the paper's 1.45B text-to-image model (jointly trained BERT)
  sr_bsr              super-resolution x4 (concat low-res image), VQ-f4
  inpainting_big      inpainting (concat masked-image latent + mask), VQ-f4
  layout2img          layout-to-image (OpenImages), VQ-f4
  semantic256         semantic synthesis (landscapes, 182 classes), VQ-f4

`tiny` shrinks any variant to run on a CPU in seconds (random-weight first
stage, 32x32 shapes images); it is what the tests exercise.
"""

import ml_collections

from ldm_jax.config import parse_variants
from ldm_jax.data.config import default_data_config
from ldm_jax.models.unet import unet_preset
from ldm_jax.training.mesh import default_mesh_config
from ldm_jax.training.optim import default_optim_config

C = ml_collections.ConfigDict

SHAPES = ("shapes_txt2img", "shapes_class", "shapes_layout", "shapes_semantic", "shapes_sr", "shapes_inpaint")
PAPER = ("celebahq_vq4", "ffhq_vq4", "lsun_bedrooms_vq4", "lsun_churches_kl8", "cin256_v2", "txt2img_kl8",
         "sr_bsr", "inpainting_big", "layout2img", "semantic256")
VARIANTS = SHAPES + PAPER + ("tiny",)

# Reference first stages (what the published LDMs were trained on).
VQ_F4 = dict(kind="vq", embed_dim=3, n_embed=8192, ddconfig=dict(
    double_z=False, z_channels=3, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=(1, 2, 4),
    num_res_blocks=2, attn_resolutions=(), dropout=0.0))
KL_F8 = dict(kind="kl", embed_dim=4, ddconfig=dict(
    double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=(1, 2, 4, 4),
    num_res_blocks=2, attn_resolutions=(), dropout=0.0))
TINY_FIRST_STAGE = dict(kind="kl", embed_dim=3, ddconfig=dict(
    double_z=True, z_channels=3, resolution=32, in_channels=3, out_ch=3, ch=16, ch_mult=(1, 2, 2),
    num_res_blocks=1, attn_resolutions=(), dropout=0.0, norm_num_groups=8, use_mid_attn=False))


def _base() -> ml_collections.ConfigDict:
  c = C()
  c.stage = "ldm"
  c.seed = 0
  # RngBitGenerator keys: as good for training, and much faster to compile on
  # CPU than threefry; "threefry2x32" restores JAX's default.
  c.prng_impl = "rbg"
  c.compilation_cache_dir = "~/.cache/ldm_jax/xla"
  c.data = default_data_config()
  c.first_stage = C(dict(checkpoint="", scale_factor=-1.0, random_init=False, model=C(VQ_F4)))
  c.unet = C()
  c.cond_stage = C(dict(kind="none"))
  c.concat = C(dict(kind="none", num_seg_classes=0, low_res_size=0, rescaler=C(dict(n_stages=0))))
  c.ldm = C(dict(use_label_emb=False, null_label=0, cache_latents=False))
  c.diffusion = C(dict(
      schedule="linear", timesteps=1000, linear_start=0.0015, linear_end=0.0195, prediction_type="eps",
      loss_type="l2", weighting="none", cond_dropout=0.0, drop_concat=False,
      # t ~ U{0..T-1} as the reference; "logit_normal": t = T * sigmoid(loc + scale * N(0, 1)) (SD3).
      timestep_sampling="uniform", timestep_loc=0.0, timestep_scale=1.0))
  c.optim = default_optim_config()
  c.optim.update(name="adamw", weight_decay=0.0, scale_lr_by_batch=True)  # base_learning_rate * batch
  c.ema = C(dict(decay=0.9999))
  c.train = C(dict(
      batch_size=48, num_steps=500_000, grad_accum_steps=1, log_every=100, checkpoint_every=5000,
      keep_checkpoints=3, sample_every=5000, progress_bar=True))
  c.sample = C(dict(
      prompts=(), labels=(), num_unconditional=16, sampler="ddim", num_steps=50, timestep_spacing="leading",
      steps_offset=1, guidance_scale=1.0, seed=0,
      guidance_interval=()))  # (low, high): guide only those timesteps (grids and eval); (): every step
  # Periodic evaluation (ldm_jax/training/eval_hook.py), off while every=0: every `every` steps,
  # FID of `num_samples` EMA samples (batches of `batch_size`, `sampler`/`num_steps`/`eta`, guidance
  # `guidance_scale`, -1: sample.guidance_scale) against `num_real` images (-1: all) of `split`
  # ("": data.eval_split) or the statistics file `ref_stats`; features of `feature_net` ("inception" with
  # `inception_weights`, "shapes_judge" with `judge_weights`). Logged as eval/fid.
  c.eval = C(dict(
      every=0, num_samples=1000, num_real=-1, batch_size=50, sampler="ddim", num_steps=50, eta=0.0,
      guidance_scale=-1.0, seed=0, split="", ref_stats="", feature_net="inception", inception_weights="",
      judge_weights=""))
  c.mesh = default_mesh_config()
  c.precision = C(dict(compute_dtype="float32"))
  c.attention_impl = "auto"
  return c


def _text_shapes(c, prompts):
  c.data.tokenizer.kind = "shapes"
  c.cond_stage = C(dict(kind="text", n_embed=128, n_layer=2, vocab_size=64, max_seq_len=32, heads=4, dim_head=32))
  c.data.tokenizer.max_length = 32
  c.diffusion.cond_dropout = 0.1
  c.sample.prompts = prompts
  c.sample.guidance_scale = 3.0


def _shapes(c, variant: str) -> None:
  """Models of the built-in dataset (64x64, KL-f4 first stage from the demo)."""
  c.data.source = "shapes"
  c.data.image_size = 64
  c.first_stage.scale_factor = -1.0
  c.ldm.cache_latents = variant not in ("shapes_sr", "shapes_inpaint")
  # Sized for a 2-core CPU (about 0.25 s per step of 16 on 16x16x3 latents):
  # widths grow where the feature maps are small, one res block per level.
  # Many small steps: 1000 steps of 32 gave colour but not yet shapes.
  c.unet = C(dict(
      image_size=16, in_channels=3, out_channels=3, model_channels=32, num_res_blocks=1, attention_resolutions=(2, 4),
      channel_mult=(1, 2, 4), num_head_channels=32, use_spatial_transformer=False, norm_num_groups=16,
      use_scale_shift_norm=False))  # named so that --ldm unet.use_scale_shift_norm=True can override it
  c.optim.update(learning_rate=1e-3, scale_lr_by_batch=False, schedule="cosine", warmup_steps=100, grad_clip_norm=1.0)
  c.ema.decay = 0.999
  # Min-SNR-5 loss weighting (Hang et al. 2023): reported ~3x faster
  # convergence, which a CPU-sized budget needs.
  c.diffusion.weighting = "min_snr"
  # Small latents need less noise (Hoogeboom et al. 2023): on 16x16x3 the
  # 0.0195 end above leaves 40% of timesteps at SNR < 0.05, where there is
  # little to learn. Stable Diffusion's betas, measured on the demo (2500
  # steps, 2-core CPU): held-out colour accuracy 68.8% -> 83.3% (89.6% in a
  # run pinned to one core), Frechet distance 718 -> 595; shape unchanged
  # (24.0% -> 20.8%).
  c.diffusion.update(linear_start=0.00085, linear_end=0.012)
  c.train.update(batch_size=16, num_steps=2500, log_every=50, checkpoint_every=500, sample_every=1250)
  # One half-batch per core: the UNet's forward + backward 1.2x faster, the whole step
  # (text encoder, Adam, EMA) only 43 vs 41 images/s; the demo splits the CPU for stage 1 anyway.
  c.mesh.cpu_devices = 2
  prompts = ("a large red circle", "a small blue square", "a large green triangle to the left of a small yellow star")
  if variant == "shapes_txt2img":
    _text_shapes(c, prompts)
    c.unet.update(use_spatial_transformer=True, context_dim=128, transformer_depth=1)
  elif variant == "shapes_class":
    c.cond_stage = C(dict(kind="class", embed_dim=128, n_classes=37))  # 36 colour x shape + null
    c.unet.update(use_spatial_transformer=True, context_dim=128)
    c.diffusion.cond_dropout = 0.1
    c.sample.labels = (0, 7, 14, 21, 28, 35)
    c.sample.guidance_scale = 3.0
  elif variant == "shapes_layout":
    c.cond_stage = C(dict(kind="layout", n_embed=128, n_layer=2, heads=4, dim_head=32, vocab_size=300,
                          max_seq_len=16, num_classes=36, grid_size=16, max_objects=3, encode_crop=False))
    c.unet.update(use_spatial_transformer=True, context_dim=128)
    c.diffusion.cond_dropout = 0.1
  elif variant == "shapes_semantic":
    c.concat = C(dict(kind="segmentation", num_seg_classes=37, low_res_size=0, rescaler=C(dict(
        n_stages=2, method="bilinear", multiplier=0.5, in_channels=37, out_channels=3))))
    c.unet.in_channels = 6
  elif variant == "shapes_sr":
    c.concat = C(dict(kind="low_res", num_seg_classes=0, low_res_size=16, rescaler=C(dict(n_stages=0))))
    c.unet.in_channels = 6
  elif variant == "shapes_inpaint":
    c.concat = C(dict(kind="inpaint", num_seg_classes=0, low_res_size=0, rescaler=C(dict(n_stages=0))))
    c.unet.in_channels = 3 + 1 + 3


def _paper(c, variant: str) -> None:
  """The paper's models with their reference configs' hyper-parameters."""
  c.first_stage.model = C(VQ_F4)
  c.data.image_size = 256
  c.optim.learning_rate = 2e-6
  if variant in ("celebahq_vq4", "ffhq_vq4", "lsun_bedrooms_vq4"):
    c.unet = C(unet_preset(variant))
    c.data.update(source="tfds", name={"celebahq_vq4": "celeb_a_hq/256", "ffhq_vq4": "ffhq",
                                       "lsun_bedrooms_vq4": "lsun/bedroom"}[variant])
    c.train.batch_size = {"celebahq_vq4": 48, "ffhq_vq4": 42, "lsun_bedrooms_vq4": 48}[variant]
  elif variant == "lsun_churches_kl8":
    c.first_stage.model = C(KL_F8)
    c.first_stage.scale_factor = 0.22765929  # reference scale_by_std result
    c.unet = C(unet_preset(variant))
    c.diffusion.linear_end = 0.0155
    c.optim.learning_rate = 5e-5
    c.train.batch_size = 96
    c.data.update(source="tfds", name="lsun/church_outdoor")
  elif variant == "cin256_v2":
    c.unet = C(unet_preset(variant))
    c.cond_stage = C(dict(kind="class", embed_dim=512, n_classes=1001))  # null class 1000
    c.diffusion.cond_dropout = 0.1
    c.optim.learning_rate = 1e-4
    c.train.batch_size = 64
    c.data.update(source="tfds", name="imagenet2012", label_key="label")
    c.sample.update(labels=(88, 301, 980), guidance_scale=3.0)
  elif variant == "txt2img_kl8":
    c.first_stage.model = C(KL_F8)
    c.first_stage.scale_factor = 0.18215
    c.unet = C(unet_preset("txt2img_1p4b"))
    c.cond_stage = C(dict(kind="text", n_embed=1280, n_layer=32))
    c.data.update(source="tfds", name="coco_captions", caption_key="captions/text")
    c.data.tokenizer.update(kind="bert", path="", max_length=77)
    c.diffusion.update(linear_start=0.00085, linear_end=0.012, cond_dropout=0.1)
    c.optim.learning_rate = 5e-5
    c.train.batch_size = 28
    c.unet.remat_policy = "full"
    c.sample.update(prompts=("a painting of a virus monster playing guitar",), guidance_scale=5.0)
  elif variant == "sr_bsr":
    c.unet = C(dict(image_size=64, in_channels=6, out_channels=3, model_channels=160, attention_resolutions=(16, 8),
                    num_res_blocks=2, channel_mult=(1, 2, 2, 4), num_head_channels=32))
    c.concat = C(dict(kind="low_res", num_seg_classes=0, low_res_size=64, rescaler=C(dict(n_stages=0))))
    c.diffusion.linear_end = 0.0155
    c.optim.learning_rate = 1e-6
    c.data.update(source="tfds", name="imagenet2012")
  elif variant == "inpainting_big":
    c.unet = C(dict(image_size=64, in_channels=7, out_channels=3, model_channels=256, attention_resolutions=(8, 4, 2),
                    num_res_blocks=2, channel_mult=(1, 2, 3, 4), num_heads=8, resblock_updown=True))
    c.concat = C(dict(kind="inpaint", num_seg_classes=0, low_res_size=0, rescaler=C(dict(n_stages=0))))
    c.diffusion.linear_end = 0.0205
    c.data.update(source="tfds", name="places365_small")
  elif variant == "layout2img":
    c.unet = C(dict(image_size=64, in_channels=3, out_channels=3, model_channels=128, attention_resolutions=(8, 4, 2),
                    num_res_blocks=2, channel_mult=(1, 2, 3, 4), num_head_channels=32, use_spatial_transformer=True,
                    transformer_depth=3, context_dim=512))
    c.cond_stage = C(dict(kind="layout"))  # layout2img-openimages256 defaults
    c.diffusion.update(linear_end=0.0205, cond_dropout=0.1)
    c.data.update(source="tfds", name="open_images_v4")
  elif variant == "semantic256":
    c.unet = C(dict(image_size=64, in_channels=6, out_channels=3, model_channels=128, attention_resolutions=(32, 16, 8),
                    num_res_blocks=2, channel_mult=(1, 4, 8), num_heads=8))
    c.concat = C(dict(kind="segmentation", num_seg_classes=182, low_res_size=0, rescaler=C(dict(
        n_stages=2, method="bilinear", multiplier=0.5, in_channels=182, out_channels=3))))
    c.diffusion.linear_end = 0.0205
    c.data.update(source="tfds", name="coco/2017_panoptic")


def _tiny(c) -> None:
  """Shrinks any variant to seconds on a CPU: shapes data, random first stage."""
  c.data.update(source="shapes", image_size=32, name="", data_dir=c.data.data_dir)
  c.data.shapes.update(num_train=64, num_validation=16, num_test=16)
  if c.data.tokenizer.kind:
    c.data.tokenizer.update(kind="shapes", path="", max_length=16)
  c.first_stage.update(checkpoint="", random_init=True, scale_factor=1.0, model=C(TINY_FIRST_STAGE))
  latent_channels = TINY_FIRST_STAGE["embed_dim"]
  extra = c.unet.in_channels - c.unet.out_channels
  if c.concat.kind == "inpaint":
    extra = 1 + latent_channels
  spatial = c.unet.get("use_spatial_transformer", False)
  # One level, attention only in the middle block (which always has it, so
  # cross-attention is still there): the suite compiles this UNet's train step
  # a dozen times, and compile time grows with its blocks. The full block
  # structure (down/up-sampling, attention per level) is tested in tests/test_unet_*.
  c.unet = C(dict(
      image_size=8, in_channels=latent_channels + extra, out_channels=latent_channels, model_channels=32,
      num_res_blocks=1, attention_resolutions=(), channel_mult=(1,), num_head_channels=16, norm_num_groups=8,
      use_spatial_transformer=spatial, context_dim=32 if spatial else None))
  if c.cond_stage.kind in ("text", "layout"):
    c.cond_stage.update(n_embed=32, n_layer=1, heads=2, dim_head=16)
    if c.cond_stage.kind == "text":
      c.cond_stage.update(vocab_size=64, max_seq_len=16)
  elif c.cond_stage.kind == "class":
    c.cond_stage.embed_dim = 32
  if c.concat.kind == "segmentation":
    c.concat.rescaler.update(n_stages=2, in_channels=c.concat.num_seg_classes, out_channels=3)
  if c.concat.kind == "low_res":
    c.concat.low_res_size = 8
  c.ldm.cache_latents = False
  c.optim.update(learning_rate=1e-3, scale_lr_by_batch=False, warmup_steps=0)
  c.train.update(batch_size=8, num_steps=4, log_every=2, checkpoint_every=2, sample_every=0, progress_bar=False)
  c.sample.update(num_steps=4, num_unconditional=2)
  c.compilation_cache_dir = ""


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  words = parse_variants(arg, VARIANTS)
  chosen = [w for w in words if w != "tiny"]
  if len(chosen) > 1:
    raise ValueError(f"choose one model variant, got {chosen}")
  variant = chosen[0] if chosen else "shapes_txt2img"
  c = _base()
  if variant in SHAPES:
    _shapes(c, variant)
  else:
    _paper(c, variant)
  if "tiny" in words:
    _tiny(c)
  return c
