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

The variants are tables, one module per family next to this file:
``ldm_shapes.py`` (shapes_*) and ``ldm_paper.py`` (the paper's models). A
family module holds ``FAMILY`` (overrides of the base config below for all
its variants) and ``VARIANTS`` (name -> overrides); a new family is a new
module listed in ``FAMILIES``.
"""

import copy
import importlib.util
import os

import ml_collections

from ldm_jax.config import parse_variants
from ldm_jax.data.config import default_data_config
from ldm_jax.parallel.mesh import default_mesh_config
from ldm_jax.training.optim import default_optim_config

C = ml_collections.ConfigDict


def load_sibling(name: str):
  """``configs/NAME.py`` as a module.

  Config files are loaded by path (absl's ``config_flags`` and
  ``ldm_jax.config.load_config`` both exec the file), not imported from a
  package, so their siblings are loaded by path too: no ``sys.path`` change,
  and a copy of ``configs/`` elsewhere reads its own tables.
  """
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"_ldm_configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


FAMILIES = {name: load_sibling(name) for name in ("ldm_shapes", "ldm_paper")}
FAMILY_OF = {variant: family for family in FAMILIES.values() for variant in family.VARIANTS}
VARIANTS = (*FAMILY_OF, "tiny")
DEFAULT_VARIANT = "shapes_txt2img"

# Reference first stages (what the published LDMs were trained on); tables
# name them in first_stage.model by their configs/autoencoder.py variant.
VQ_F4 = dict(kind="vq", embed_dim=3, n_embed=8192, ddconfig=dict(
    double_z=False, z_channels=3, resolution=256, in_channels=3, out_ch=3, ch=128,
    ch_mult=(1, 2, 4), num_res_blocks=2, attn_resolutions=(), dropout=0.0))
KL_F8 = dict(kind="kl", embed_dim=4, ddconfig=dict(
    double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
    ch_mult=(1, 2, 4, 4), num_res_blocks=2, attn_resolutions=(), dropout=0.0))
# models/first_stage_models/vq-f4-noattn (ddconfig attn_type: none): no mid-block attention, which
# the paper's inpainting LDM uses to decode 512x512 images with less memory.
VQ_F4_NOATTN = dict(VQ_F4, ddconfig=dict(VQ_F4["ddconfig"], use_mid_attn=False))
# "identity": pixel space (f=1), the LDM-1 baseline of the paper's compression study.
FIRST_STAGES = {"vq_f4": VQ_F4, "vq_f4_noattn": VQ_F4_NOATTN, "kl_f8": KL_F8,
                "identity": dict(kind="identity", embed_dim=3)}
TINY_FIRST_STAGE = dict(kind="kl", embed_dim=3, ddconfig=dict(
    double_z=True, z_channels=3, resolution=32, in_channels=3, out_ch=3, ch=16, ch_mult=(1, 2, 2),
    num_res_blocks=1, attn_resolutions=(), dropout=0.0, norm_num_groups=8, use_mid_attn=False))


def concat_section(kind: str = "none", num_seg_classes: int = 0, low_res_size: int = 0,
                   latent_first: bool = False) -> ml_collections.ConfigDict:
  """The ``concat`` section: what is concatenated to the UNet's input z_t.

  ``kind``: ``none``, ``low_res`` (the image at ``low_res_size``), ``inpaint``
  (mask + the masked image's latents; ``latent_first``: the paper's inpainting
  LDM's order ``[z_t, masked latent, mask]`` instead of SD's ``[z_t, mask,
  masked latent]``) or ``segmentation`` (one-hot maps of ``num_seg_classes``
  classes, which the rescaler halves twice and maps to 3 channels, as the
  reference's semantic-synthesis models; identity otherwise).
  """
  if latent_first and kind != "inpaint":
    raise ValueError(f"concat latent_first applies to kind 'inpaint' only, not {kind!r}")
  rescaler = dict(n_stages=0)
  if kind == "segmentation":
    rescaler = dict(n_stages=2, method="bilinear", multiplier=0.5, in_channels=num_seg_classes,
                    out_channels=3)
  return C(dict(kind=kind, num_seg_classes=num_seg_classes, low_res_size=low_res_size,
                latent_first=latent_first, rescaler=C(rescaler)))


def _base() -> ml_collections.ConfigDict:
  c = C()
  c.stage = "ldm"
  c.seed = 0
  # RngBitGenerator keys: as good for training, and much faster to compile on
  # CPU than threefry; "threefry2x32" restores JAX's default.
  c.prng_impl = "rbg"
  c.compilation_cache_dir = "~/.cache/ldm_jax/xla"
  c.data = default_data_config()
  c.first_stage = C(dict(checkpoint="", scale_factor=-1.0, random_init=False,
                         model=C(VQ_F4)))
  c.unet = C()
  c.cond_stage = C(dict(kind="none"))
  c.concat = concat_section()
  c.ldm = C(dict(use_label_emb=False, null_label=0, cache_latents=False))
  c.diffusion = C(dict(
      schedule="linear", timesteps=1000, linear_start=0.0015, linear_end=0.0195,
      prediction_type="eps", loss_type="l2", weighting="none", cond_dropout=0.0, drop_concat=False,
      # t ~ U{0..T-1} as the reference;
      # "logit_normal": t = T * sigmoid(loc + scale * N(0, 1)) (SD3).
      timestep_sampling="uniform", timestep_loc=0.0, timestep_scale=1.0))
  c.optim = default_optim_config()
  # The reference's lr = base_learning_rate * batch.
  c.optim.update(name="adamw", weight_decay=0.0, scale_lr_by_batch=True)
  c.ema = C(dict(decay=0.9999))
  c.train = C(dict(
      batch_size=48, num_steps=500_000, grad_accum_steps=1, log_every=100, checkpoint_every=5000,
      keep_checkpoints=3, sample_every=5000, progress_bar=True))
  c.sample = C(dict(
      prompts=(), labels=(), num_unconditional=16, sampler="ddim", num_steps=50,
      timestep_spacing="leading", steps_offset=1, guidance_scale=1.0, seed=0,
      # (low, high): guide only those timesteps (grids and eval); (): every step.
      guidance_interval=()))
  # Periodic evaluation (ldm_jax/training/eval_hook.py), off while every=0: every `every` steps,
  # FID of `num_samples` EMA samples (batches of `batch_size`, `sampler`/`num_steps`/`eta`,
  # guidance `guidance_scale`, -1: sample.guidance_scale) against `num_real` images (-1: all) of
  # `split` ("": data.eval_split) or the statistics file `ref_stats`; features of `feature_net`
  # ("inception" with `inception_weights`, "shapes_judge" with `judge_weights`). Logged as eval/fid.
  c.eval = C(dict(
      every=0, num_samples=1000, num_real=-1, batch_size=50, sampler="ddim", num_steps=50, eta=0.0,
      guidance_scale=-1.0, seed=0, split="", ref_stats="", feature_net="inception",
      inception_weights="", judge_weights=""))
  c.mesh = default_mesh_config()
  c.precision = C(dict(compute_dtype="float32"))
  c.attention_impl = "auto"
  return c


def base_config() -> ml_collections.ConfigDict:
  """The base every stage-2 family starts from (``configs/sd_finetune.py`` too)."""
  return _base()


def apply_overrides(c: ml_collections.ConfigDict, overrides: dict) -> None:
  """Applies one table entry: sections merge key by key (``ConfigDict.update``).

  Two entries are expanded first, since their keys depend on what they name:
  ``first_stage.model`` (a name in ``FIRST_STAGES``) and ``concat`` (the
  arguments of :func:`concat_section`) replace their whole section.
  """
  unknown = sorted(set(overrides) - set(c.keys()))
  if unknown:
    raise KeyError(f"table sections {unknown} are not in the base config: {sorted(c.keys())}")
  overrides = copy.deepcopy(overrides)  # tables are shared between calls; leave them as written
  first_stage = overrides.get("first_stage", {})
  if "model" in first_stage:
    c.first_stage.model = C(FIRST_STAGES[first_stage.pop("model")])
  if "concat" in overrides:
    c.concat = concat_section(**overrides.pop("concat"))
  c.update(overrides)


# What `tiny` makes of each cross-attention encoder: narrow, one layer.
_TINY_COND_STAGE = {
    "text": dict(n_embed=32, n_layer=1, heads=2, dim_head=16, vocab_size=64, max_seq_len=16),
    "layout": dict(n_embed=32, n_layer=1, heads=2, dim_head=16),
    "class": dict(embed_dim=32),
}


def _tiny(c) -> None:
  """Shrinks any variant to seconds on a CPU: shapes data, random first stage."""
  c.data.update(source="shapes", image_size=32, name="", data_dir=c.data.data_dir)
  c.data.shapes.update(num_train=64, num_validation=16, num_test=16)
  if c.data.tokenizer.kind:
    c.data.tokenizer.update(kind="shapes", path="", max_length=16)
  # update() merges: keys of the variant's first stage that the tiny one lacks
  # (a VQ's n_embed) stay, unused by the KL model.
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
      image_size=8, in_channels=latent_channels + extra, out_channels=latent_channels,
      model_channels=32, num_res_blocks=1, attention_resolutions=(), channel_mult=(1,),
      num_head_channels=16, norm_num_groups=8, use_spatial_transformer=spatial,
      context_dim=32 if spatial else None))
  c.cond_stage.update(_TINY_COND_STAGE.get(c.cond_stage.kind, {}))
  if c.concat.kind == "low_res":
    c.concat.low_res_size = 8
  c.ldm.cache_latents = False
  c.optim.update(learning_rate=1e-3, scale_lr_by_batch=False, schedule="constant", warmup_steps=0)
  c.train.update(batch_size=8, num_steps=4, log_every=2, checkpoint_every=2, sample_every=0,
                 progress_bar=False)
  c.sample.update(num_steps=4, num_unconditional=2)
  c.compilation_cache_dir = ""


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  words = parse_variants(arg, VARIANTS)
  chosen = [w for w in words if w != "tiny"]
  if len(chosen) > 1:
    raise ValueError(f"choose one model variant, got {chosen}")
  variant = chosen[0] if chosen else DEFAULT_VARIANT
  family = FAMILY_OF[variant]
  c = _base()
  apply_overrides(c, family.FAMILY)
  apply_overrides(c, family.VARIANTS[variant])
  if "tiny" in words:
    _tiny(c)
  return c
