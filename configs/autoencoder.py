"""Stage 1: the paper's first-stage model zoo (KL- and VQ-regularised autoencoders).

  python train.py --config configs/autoencoder.py:kl_f8 --workdir runs/kl_f8 \
      --config.loss.lpips_weights=lpips_vgg.npz
  python train.py --config configs/autoencoder.py:demo --workdir /tmp/ae_demo

Variant words (comma-separated):

- model (one of): kl_f4, kl_f8 (default), kl_f16, kl_f32, vq_f4,
  vq_f4_noattn, vq_f8, vq_f8_n256, vq_f16: CompVis/latent-diffusion's
  ``models/first_stage_models/*/config.yaml`` and ``configs/autoencoder/``
  (ch 128, 2 res blocks, 256 px, Adam β=(0.5, 0.9) at 4.5e-6 × batch).
- data: shapes (default, the built-in dataset), folder (set
  ``--config.data.path=DIR``), ``tfds:NAME`` (a prepared TFDS dataset, e.g.
  ``tfds:celeb_a_hq/256``).
- tiny: shrinks any variant to run on a CPU in seconds (tests).
- demo / demo_vq: a small f=4 autoencoder on 64 px shapes, trained in about
  five minutes on a 2-core CPU (README demo; about 28.5 dB validation PSNR).

The perceptual loss (LPIPS, ``perceptual_weight=1`` as the reference) needs
converted weights: ``--config.loss.lpips_weights=FILE`` (see
``python -m ldm_jax.interop.lpips``), or ``--config.loss.perceptual_weight=0``.
"""


import ml_collections

from ldm_jax.config import ConfigError, parse_variants
from ldm_jax.data.config import default_data_config
from ldm_jax.parallel.mesh import default_mesh_config
from ldm_jax.training.optim import default_optim_config

# Loss settings of the reference lossconfigs (LPIPSWithDiscriminator /
# VQLPIPSWithDiscriminator params); anything unset keeps the class default.
_KL_LOSS = dict(disc_start=50001, kl_weight=1e-6, disc_weight=0.5)
_VQ_F4_LOSS = dict(disc_start=0, disc_weight=0.75, codebook_weight=1.0)
_VQ_F16_LOSS = dict(disc_start=250001, disc_weight=0.75, disc_num_layers=2, codebook_weight=1.0)

# The model zoo: what differs between the reference autoencoders. Unset:
# n_embed=0 (KL models have no codebook), attn_resolutions=() and mid-block
# attention on; _model() adds what they share (ch 128, 2 res blocks, 256 px).
ZOO = {
    "kl_f4": dict(kind="kl", embed_dim=3, ch_mult=(1, 2, 4), loss=_KL_LOSS),
    "kl_f8": dict(kind="kl", embed_dim=4, ch_mult=(1, 2, 4, 4), loss=_KL_LOSS),
    "kl_f16": dict(kind="kl", embed_dim=16, ch_mult=(1, 1, 2, 2, 4), attn_resolutions=(16,),
                   loss=_KL_LOSS),
    "kl_f32": dict(kind="kl", embed_dim=64, ch_mult=(1, 1, 2, 2, 4, 4), attn_resolutions=(16, 8),
                   loss=_KL_LOSS),
    "vq_f4": dict(kind="vq", embed_dim=3, n_embed=8192, ch_mult=(1, 2, 4), loss=_VQ_F4_LOSS),
    "vq_f4_noattn": dict(kind="vq", embed_dim=3, n_embed=8192, ch_mult=(1, 2, 4), mid_attn=False,
                         loss=_VQ_F4_LOSS),
    "vq_f8": dict(kind="vq", embed_dim=4, n_embed=16384, ch_mult=(1, 2, 2, 4),
                  attn_resolutions=(32,),
                  loss=dict(disc_start=1, disc_weight=0.6, disc_num_layers=2, codebook_weight=1.0)),
    "vq_f8_n256": dict(kind="vq", embed_dim=4, n_embed=256, ch_mult=(1, 2, 2, 4),
                       attn_resolutions=(32,),
                       loss=dict(disc_start=250001, disc_weight=0.75, codebook_weight=1.0)),
    "vq_f16": dict(kind="vq", embed_dim=8, n_embed=16384, ch_mult=(1, 1, 2, 2, 4),
                   attn_resolutions=(16,), loss=_VQ_F16_LOSS),
}

# Dataset words: overrides of the data section. ``tfds:NAME`` words are
# handled apart, their name being free.
DATA_WORDS = {
    "shapes": dict(),  # the default source
    # --config.data.path=DIR ("{split}" is replaced by the split name).
    "folder": dict(source="folder"),
}

# Demo models: small f=4 autoencoders on 64 px shapes, tuned for a 2-core CPU
# (README). Each is a zoo model, then _DEMO's overrides, then its own.
_DEMO = dict(
    model=dict(ddconfig=dict(
        # ch 16: ch 32 took 3x as long per step (0.75 vs 0.25 s at widths (1, 2, 4)
        # on a 2-core CPU).
        ch=16, num_res_blocks=1, norm_num_groups=8, resolution=64, attn_type="none",
        # Widths 16, 16, 32 instead of kl_f4's multipliers (1, 2, 4): 40% of the
        # FLOPs and no worse. Validation PSNR after 2000 steps on one device, seeds
        # 0 / 1 / 2: (1, 2, 4) 28.41 / 28.58 / 28.46 dB, (1, 2, 2) 28.50 / 28.26 dB
        # (seeds 0 / 1), (1, 1, 2) 28.63 / 28.26 / 28.73 dB.
        ch_mult=(1, 1, 2),
    )),
    data=dict(image_size=64),
    # No LPIPS weights on a fresh machine; the GAN would only cost time here.
    # Squared error and a KL weight of 1e-4 (the reference: L1, 1e-6) learn
    # the shapes' colours and outlines faster; measured (seed 0, 2-core CPU):
    # L1 / 1e-6, 1500 steps: 25.1 dB; L2 / 1e-6: 24.2 dB; L2 / 1e-4: 27.3 dB;
    # L2 / 1e-4, 2000 steps: 28.6 dB. What matters for stage 2: the shapes
    # judge names the shape of 66.7% of renders after the L1 one's round trip,
    # 79.6% after L2 / 1e-4 at 1500 steps, 85.0% at 2000. (L2 / 1e-6 at 2500
    # steps, 27.3 dB, gave a first stage stage 2 could not use: its posterior
    # noise is tiny and the LDM's samples decoded to texture.)
    loss=dict(perceptual_weight=0.0, disc_factor=0.0, pixel_loss="l2"),
    # Measured: luminance is learnt in ~300 steps, the shapes' colours only
    # after ~700 (they cover few pixels); learning rates from 1e-3 to 5e-3,
    # Adam betas and full 64 px images instead of crops did not change that.
    optim=dict(learning_rate=2e-3, scale_lr_by_batch=False, schedule="cosine", warmup_steps=20),
    # Two CPU devices, one half-batch per core: 1.5x the images/s of one device (81 vs 54).
    mesh=dict(cpu_devices=2),
    train=dict(
        batch_size=16, crop_size=32, num_steps=2000, log_every=50, checkpoint_every=500,
        eval_every=500, num_eval_images=64, eval_batch_size=16,
    ),
)
# name: (zoo model, overrides after _DEMO's)
DEMOS = {
    "demo": ("kl_f4", dict(loss=dict(
        kl_weight=1e-4,
        # The reference's init starts the posterior at std 1 while the young
        # encoder's means spread by ~0.2: the decoder learns from whichever latent
        # channel pulls ahead and the others stay noisy (seed 1, 2000 steps:
        # posterior SNR 1.4e6 on one channel, 288 and 851 on the others). Starting
        # at std 0.05 keeps all three in use. Seeds 0 / 1 / 2 on one device:
        # 28.58 / 26.69 / 27.40 dB before, 28.41 / 28.58 / 28.46 dB with it.
        posterior_logvar_init=-6.0,
    ))),
    "demo_vq": ("vq_f4", dict(model=dict(n_embed=512))),
}
OTHER_WORDS = ("tiny",)
KNOWN = (*ZOO, *DATA_WORDS, *OTHER_WORDS, *DEMOS)
DEFAULT_MODEL = "kl_f8"


def _model(name: str) -> ml_collections.ConfigDict:
  zoo = ZOO[name]
  kind, embed_dim = zoo["kind"], zoo["embed_dim"]
  ddconfig = dict(
      double_z=kind == "kl", z_channels=embed_dim, resolution=256, in_channels=3, out_ch=3, ch=128,
      ch_mult=zoo["ch_mult"], num_res_blocks=2, attn_resolutions=zoo.get("attn_resolutions", ()),
      dropout=0.0, attn_type="vanilla" if zoo.get("mid_attn", True) else "none", norm_num_groups=32,
  )
  # n_embed is ignored by KL models; kept so that every variant has the same keys.
  return ml_collections.ConfigDict(dict(
      kind=kind, embed_dim=embed_dim, n_embed=zoo.get("n_embed", 0), ddconfig=ddconfig))


def _loss(name: str) -> ml_collections.ConfigDict:
  loss = dict(
      # Stage1LossConfig (reference names and defaults).
      disc_start=0, logvar_init=0.0, kl_weight=1.0, codebook_weight=1.0, perceptual_weight=1.0,
      disc_factor=1.0, disc_weight=1.0, disc_loss="hinge",
      pixel_loss="l1",  # not a reference key: "l2" trades the reference's L1 for squared error
      # Not a reference key: initial posterior log-variance (KL; 0: the reference).
      posterior_logvar_init=0.0,
      # NLayerDiscriminator.
      disc_num_layers=3, disc_in_channels=3, disc_ndf=64, use_actnorm=False,
      # Converted LPIPS params (.npz/.safetensors); needed when perceptual_weight > 0.
      lpips_weights="",
      train_logvar=False,  # the reference's AutoencoderKL optimiser leaves logvar out
  )
  loss.update(ZOO[name]["loss"])
  return ml_collections.ConfigDict(loss)


def _optim() -> ml_collections.ConfigDict:
  optim = default_optim_config()
  optim.name, optim.b1, optim.b2, optim.weight_decay = "adam", 0.5, 0.9, 0.0
  optim.learning_rate = 4.5e-6  # base_learning_rate
  optim.scale_lr_by_batch = True  # the reference's lr = base_lr * batch (x GPUs x accumulation)
  return optim


def _train() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      batch_size=8,
      num_steps=500_000,
      log_every=100,
      checkpoint_every=5000,
      eval_every=5000,
      keep_checkpoints=3,
      crop_size=0,  # > 0: train on random crops of this size (in the step, resume-exact)
      num_eval_images=64,  # fixed validation images for PSNR / LPIPS
      num_grid_images=8,  # columns of the input | reconstruction grid
      num_scale_images=64,  # fixed training images for the latent scale factor
      eval_batch_size=8,
      progress_bar=True,
  ))


def _data(words: list[str], tfds_names: list[str]) -> ml_collections.ConfigDict:
  data = default_data_config()
  data.image_size = 256
  chosen = [w for w in words if w in DATA_WORDS] + tfds_names
  if len(chosen) > 1:
    raise ConfigError(f"choose one dataset word, got {chosen}")
  if tfds_names:
    data.source, data.name = "tfds", tfds_names[0].split(":", 1)[1]
  elif chosen:
    data.update(DATA_WORDS[chosen[0]])
  return data


def _tiny(config: ml_collections.ConfigDict) -> None:
  """A few seconds on a CPU, whatever the variant: same levels, tiny widths."""
  dd = config.model.ddconfig
  scale = 32 / dd.resolution
  dd.ch, dd.num_res_blocks, dd.norm_num_groups, dd.resolution = 16, 1, 4, 32
  # Attention stays at the same depth of the (now 32 px) pyramid.
  dd.attn_resolutions = tuple(max(int(r * scale), 1) for r in dd.attn_resolutions)
  if config.model.kind == "vq":
    config.model.n_embed = min(config.model.n_embed, 64)
  config.data.image_size = 32
  config.data.shapes.update(dict(num_train=64, num_validation=16, num_test=8))
  config.loss.update(dict(disc_ndf=8, disc_num_layers=2, perceptual_weight=0.0, disc_start=5))
  config.optim.update(dict(learning_rate=3e-3, scale_lr_by_batch=False))
  config.train.update(dict(
      batch_size=8, num_steps=10, log_every=1, checkpoint_every=5, eval_every=5, num_eval_images=8,
      num_scale_images=8, eval_batch_size=8, num_grid_images=4, progress_bar=False,
  ))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  words = [w for w in (arg or "").split(",") if w]
  tfds_names = [w for w in words if w.startswith("tfds:")]
  words = parse_variants(",".join(w for w in words if w not in tfds_names), KNOWN)
  models = [w for w in words if w in ZOO]
  if len(models) > 1:
    raise ConfigError(f"choose one model variant, got {models}")
  demos = [w for w in words if w in DEMOS]
  if demos and (models or len(demos) > 1):
    raise ConfigError(
        f"'demo' and 'demo_vq' are complete models; do not combine them with {models + demos[1:]}")
  model = DEMOS[demos[0]][0] if demos else (models[0] if models else DEFAULT_MODEL)

  config = ml_collections.ConfigDict()
  config.stage = "autoencoder"
  config.seed = 0
  # RngBitGenerator keys: as good for training, and their init programs
  # compile several times faster on CPU than threefry's (54 s vs 11 s for
  # the tiny test model). "threefry2x32" restores JAX's default.
  config.prng_impl = "rbg"
  config.compilation_cache_dir = "~/.cache/ldm_jax/xla"  # "" disables the persistent cache
  config.model = _model(model)
  config.loss = _loss(model)
  config.optim = _optim()
  config.train = _train()
  config.data = _data(words, tfds_names)
  config.mesh = default_mesh_config()
  if demos:
    config.update(_DEMO)  # update() merges section by section, key by key
    config.update(DEMOS[demos[0]][1])
  if "tiny" in words:
    _tiny(config)
  return config
