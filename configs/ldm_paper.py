"""The paper's latent diffusion models, as tables (loaded by ``configs/ldm.py``).

  python train.py --config configs/ldm.py:cin256_v2 --workdir RUN \
      --config.first_stage.checkpoint=STAGE1_RUN

Hyper-parameters of CompVis/latent-diffusion's reference configs
(``configs/latent-diffusion/*.yaml`` and ``models/ldm/*/config.yaml``); each
entry names its YAML. Where a YAML has no ``data`` section (an evaluation
config), the batch size is the paper's (Rombach et al. 2022, Tab. 12 and 15).
``docs/paper-configs.md`` lists every value with its source, and
``tests/test_paper_configs.py`` checks them.

``FAMILY`` overrides ``configs/ldm.py``'s base config for every variant here,
then ``VARIANTS[name]`` overrides that. Each entry maps a section to the keys
it changes (nested sections merge key by key); ``concat`` gives the arguments
of ``configs/ldm.py``'s ``concat_section``, ``first_stage.model`` the name of
a reference first stage there.
"""

from ldm_jax.models.unet import unet_preset

# What every reference LatentDiffusion does unless its YAML says otherwise: 1000 steps of the "linear"
# (sqrt-spaced) schedule, eps-prediction, L2 loss, an EMA of decay 0.9999 (LitEma), scale_factor 1
# (VQ LDMs diffuse the codebook-scale latents as they are), and torch.optim.AdamW with its default
# weight decay 0.01 on learning_rate * global batch (main.py --scale_lr, True by default).
FAMILY = dict(
    first_stage=dict(model="vq_f4", scale_factor=1.0),
    data=dict(image_size=256),
    diffusion=dict(schedule="linear", timesteps=1000, prediction_type="eps", loss_type="l2"),
    optim=dict(name="adamw", weight_decay=0.01, scale_lr_by_batch=True, schedule="constant", warmup_steps=0),
    ema=dict(decay=0.9999),
)

# lsun_churches-ldm-kl-8.yaml's scheduler_config: LambdaLinearScheduler, 10k warm-up steps from 1e-6.
_CHURCHES_WARMUP = dict(schedule="lambda_linear", warmup_steps=10000, f_start=1e-6, f_max=1.0, f_min=1.0,
                        cycle_length=10**13)
# models/ldm/inpainting_big/config.yaml's scheduler_config: LambdaWarmUpCosineScheduler
# (lr_start 0.001, lr_max 0.1, lr_min 0.0001 over max_decay_steps 50000).
_INPAINTING_WARMUP = dict(schedule="lambda_warmup_cosine", warmup_steps=1000, f_start=0.001, f_max=0.1,
                          f_min=0.0001, cycle_length=50000)

VARIANTS = {
    "celebahq_vq4": dict(  # configs/latent-diffusion/celebahq-ldm-vq-4.yaml
        unet=unet_preset("celebahq_vq4"),
        data=dict(source="tfds", name="celeb_a_hq/256"),
        diffusion=dict(linear_start=0.0015, linear_end=0.0195),
        optim=dict(learning_rate=2e-6),
        train=dict(batch_size=48),
    ),
    "ffhq_vq4": dict(  # configs/latent-diffusion/ffhq-ldm-vq-4.yaml
        unet=unet_preset("ffhq_vq4"),
        data=dict(source="tfds", name="ffhq"),
        diffusion=dict(linear_start=0.0015, linear_end=0.0195),
        optim=dict(learning_rate=2e-6),
        train=dict(batch_size=42),
    ),
    "lsun_bedrooms_vq4": dict(  # configs/latent-diffusion/lsun_bedrooms-ldm-vq-4.yaml
        unet=unet_preset("lsun_bedrooms_vq4"),
        data=dict(source="tfds", name="lsun/bedroom"),
        diffusion=dict(linear_start=0.0015, linear_end=0.0195),
        optim=dict(learning_rate=2e-6),
        train=dict(batch_size=48),
    ),
    "lsun_churches_kl8": dict(  # configs/latent-diffusion/lsun_churches-ldm-kl-8.yaml
        # scale_by_std: 1/std of the first batch's latents; this is the value the released model stores.
        first_stage=dict(model="kl_f8", scale_factor=0.22765929),
        unet=unet_preset("lsun_churches_kl8"),
        diffusion=dict(linear_start=0.0015, linear_end=0.0155, loss_type="l1"),
        # "set to target_lr by starting main.py with '--scale_lr False'"
        optim=dict(learning_rate=5e-5, scale_lr_by_batch=False, **_CHURCHES_WARMUP),
        train=dict(batch_size=96),
        data=dict(source="tfds", name="lsun/church_outdoor"),
    ),
    "cin256_v2": dict(  # configs/latent-diffusion/cin256-v2.yaml
        unet=unet_preset("cin256_v2"),
        cond_stage=dict(kind="class", embed_dim=512, n_classes=1001),  # null class 1000
        diffusion=dict(linear_start=0.0015, linear_end=0.0195, cond_dropout=0.1),
        # The paper's 1e-4 at batch 1200 (Tab. 15): the YAML's rate, not scaled by the batch.
        optim=dict(learning_rate=1e-4, scale_lr_by_batch=False),
        ema=dict(decay=0.0),  # use_ema: False
        train=dict(batch_size=1200),
        data=dict(source="tfds", name="imagenet2012", label_key="label"),
        sample=dict(labels=(88, 301, 980), guidance_scale=3.0),
    ),
    "txt2img_kl8": dict(  # configs/latent-diffusion/txt2img-1p4B-eval.yaml
        first_stage=dict(model="kl_f8", scale_factor=0.18215),
        unet=unet_preset("txt2img_1p4b", remat_policy="full"),  # use_checkpoint: true
        cond_stage=dict(kind="text", n_embed=1280, n_layer=32, vocab_size=30522, max_seq_len=77),
        data=dict(source="tfds", name="coco_captions", caption_key="captions/text",
                  tokenizer=dict(kind="bert", path="", max_length=77)),
        diffusion=dict(linear_start=0.00085, linear_end=0.012, cond_dropout=0.1),
        # The YAML's 5e-5, unscaled (the paper's Tab. 15 gives 1e-4 at batch 680).
        optim=dict(learning_rate=5e-5, scale_lr_by_batch=False),
        ema=dict(decay=0.0),  # use_ema: False
        train=dict(batch_size=680),
        sample=dict(prompts=("a painting of a virus monster playing guitar",), guidance_scale=5.0),
    ),
    "sr_bsr": dict(  # models/ldm/bsr_sr/config.yaml
        unet=unet_preset("sr_bsr"),
        concat=dict(kind="low_res", low_res_size=64),
        diffusion=dict(linear_start=0.0015, linear_end=0.0155, loss_type="l2"),
        optim=dict(learning_rate=1e-6),
        train=dict(batch_size=64),
        data=dict(source="tfds", name="imagenet2012"),
    ),
    "inpainting_big": dict(  # models/ldm/inpainting_big/config.yaml
        first_stage=dict(model="vq_f4_noattn"),
        unet=unet_preset("inpainting_big"),
        # cond_stage_config __is_first_stage__: [z_t, masked image's latent, mask] (scripts/inpaint.py).
        concat=dict(kind="inpaint", latent_first=True),
        diffusion=dict(linear_start=0.0015, linear_end=0.0205, loss_type="l1"),
        optim=dict(learning_rate=1e-6, **_INPAINTING_WARMUP),
        train=dict(batch_size=128),  # Tab. 15: eight V100s
        data=dict(source="tfds", name="places365_small"),
    ),
    "layout2img": dict(  # models/ldm/layout2img-openimages256/config.yaml
        unet=unet_preset("layout2img"),
        cond_stage=dict(kind="layout", n_embed=512, n_layer=16, vocab_size=8192, max_seq_len=92),
        # No condition dropout: the YAML has none and the paper samples layouts without guidance.
        diffusion=dict(linear_start=0.0015, linear_end=0.0205, loss_type="l1", cond_dropout=0.0),
        optim=dict(learning_rate=2e-6),
        train=dict(batch_size=24),
        data=dict(source="tfds", name="open_images_v4"),
    ),
    "semantic256": dict(  # models/ldm/semantic_synthesis256/config.yaml
        unet=unet_preset("semantic256"),
        concat=dict(kind="segmentation", num_seg_classes=182),
        diffusion=dict(linear_start=0.0015, linear_end=0.0205, loss_type="l1"),
        optim=dict(learning_rate=1e-6),
        train=dict(batch_size=48),  # Tab. 15, semantic-map-to-image (4.8e-5 = 48 x 1e-6)
        data=dict(source="tfds", name="coco/2017_panoptic"),
    ),
}
