"""The paper's latent diffusion models, as tables (loaded by ``configs/ldm.py``).

  python train.py --config configs/ldm.py:cin256_v2 --workdir RUN \
      --config.first_stage.checkpoint=STAGE1_RUN

Hyper-parameters of CompVis/latent-diffusion's reference configs
(``configs/latent-diffusion/*.yaml`` and ``models/ldm/*/config.yaml``).
``FAMILY`` overrides ``configs/ldm.py``'s base config for every variant here,
then ``VARIANTS[name]`` overrides that. Each entry maps a section to the keys
it changes (nested sections merge key by key); ``concat`` gives the arguments
of ``configs/ldm.py``'s ``concat_section``, ``first_stage.model`` the name of
a reference first stage there.
"""

from ldm_jax.models.unet import unet_preset

FAMILY = dict(
    first_stage=dict(model="vq_f4"),
    data=dict(image_size=256),
    optim=dict(learning_rate=2e-6),
)

VARIANTS = {
    "celebahq_vq4": dict(
        unet=unet_preset("celebahq_vq4"),
        data=dict(source="tfds", name="celeb_a_hq/256"),
        train=dict(batch_size=48),
    ),
    "ffhq_vq4": dict(
        unet=unet_preset("ffhq_vq4"),
        data=dict(source="tfds", name="ffhq"),
        train=dict(batch_size=42),
    ),
    "lsun_bedrooms_vq4": dict(
        unet=unet_preset("lsun_bedrooms_vq4"),
        data=dict(source="tfds", name="lsun/bedroom"),
        train=dict(batch_size=48),
    ),
    "lsun_churches_kl8": dict(
        first_stage=dict(model="kl_f8", scale_factor=0.22765929),  # reference scale_by_std result
        unet=unet_preset("lsun_churches_kl8"),
        diffusion=dict(linear_end=0.0155),
        optim=dict(learning_rate=5e-5),
        train=dict(batch_size=96),
        data=dict(source="tfds", name="lsun/church_outdoor"),
    ),
    "cin256_v2": dict(
        unet=unet_preset("cin256_v2"),
        cond_stage=dict(kind="class", embed_dim=512, n_classes=1001),  # null class 1000
        diffusion=dict(cond_dropout=0.1),
        optim=dict(learning_rate=1e-4),
        train=dict(batch_size=64),
        data=dict(source="tfds", name="imagenet2012", label_key="label"),
        sample=dict(labels=(88, 301, 980), guidance_scale=3.0),
    ),
    "txt2img_kl8": dict(
        first_stage=dict(model="kl_f8", scale_factor=0.18215),
        unet=unet_preset("txt2img_1p4b", remat_policy="full"),
        cond_stage=dict(kind="text", n_embed=1280, n_layer=32),
        data=dict(source="tfds", name="coco_captions", caption_key="captions/text",
                  tokenizer=dict(kind="bert", path="", max_length=77)),
        diffusion=dict(linear_start=0.00085, linear_end=0.012, cond_dropout=0.1),
        optim=dict(learning_rate=5e-5),
        train=dict(batch_size=28),
        sample=dict(prompts=("a painting of a virus monster playing guitar",), guidance_scale=5.0),
    ),
    "sr_bsr": dict(
        unet=dict(image_size=64, in_channels=6, out_channels=3, model_channels=160,
                  attention_resolutions=(16, 8), num_res_blocks=2, channel_mult=(1, 2, 2, 4),
                  num_head_channels=32),
        concat=dict(kind="low_res", low_res_size=64),
        diffusion=dict(linear_end=0.0155),
        optim=dict(learning_rate=1e-6),
        data=dict(source="tfds", name="imagenet2012"),
    ),
    "inpainting_big": dict(
        unet=dict(image_size=64, in_channels=7, out_channels=3, model_channels=256,
                  attention_resolutions=(8, 4, 2), num_res_blocks=2, channel_mult=(1, 2, 3, 4),
                  num_heads=8, resblock_updown=True),
        concat=dict(kind="inpaint"),
        diffusion=dict(linear_end=0.0205),
        data=dict(source="tfds", name="places365_small"),
    ),
    "layout2img": dict(
        unet=dict(image_size=64, in_channels=3, out_channels=3, model_channels=128,
                  attention_resolutions=(8, 4, 2), num_res_blocks=2, channel_mult=(1, 2, 3, 4),
                  num_head_channels=32, use_spatial_transformer=True, transformer_depth=3,
                  context_dim=512),
        cond_stage=dict(kind="layout"),  # layout2img-openimages256 defaults
        diffusion=dict(linear_end=0.0205, cond_dropout=0.1),
        data=dict(source="tfds", name="open_images_v4"),
    ),
    "semantic256": dict(
        unet=dict(image_size=64, in_channels=6, out_channels=3, model_channels=128,
                  attention_resolutions=(32, 16, 8), num_res_blocks=2, channel_mult=(1, 4, 8),
                  num_heads=8),
        concat=dict(kind="segmentation", num_seg_classes=182),
        diffusion=dict(linear_end=0.0205),
        data=dict(source="tfds", name="coco/2017_panoptic"),
    ),
}
