"""Stage-2 variants on the built-in shapes dataset, as tables (loaded by ``configs/ldm.py``).

  python train.py --config configs/ldm.py:shapes_txt2img[,tiny] --workdir RUN \
      --config.first_stage.checkpoint=STAGE1_RUN

``FAMILY`` overrides ``configs/ldm.py``'s base config for every variant here,
then ``VARIANTS[name]`` overrides that. Each entry maps a section to the keys
it changes (nested sections merge key by key); ``concat`` gives the arguments
of ``configs/ldm.py``'s ``concat_section``, ``first_stage.model`` the name of
a reference first stage there.
"""

# Models of the built-in dataset (64x64, KL-f4 first stage from the demo).
FAMILY = dict(
    data=dict(source="shapes", image_size=64),
    first_stage=dict(scale_factor=-1.0),
    ldm=dict(cache_latents=True),
    # Sized for a 2-core CPU (about 0.25 s per step of 16 on 16x16x3 latents):
    # widths grow where the feature maps are small, one res block per level.
    # Many small steps: 1000 steps of 32 gave colour but not yet shapes.
    unet=dict(
        image_size=16, in_channels=3, out_channels=3, model_channels=32, num_res_blocks=1,
        attention_resolutions=(2, 4), channel_mult=(1, 2, 4), num_head_channels=32,
        use_spatial_transformer=False, norm_num_groups=16,
        # Named so that --ldm unet.use_scale_shift_norm=True can override it.
        use_scale_shift_norm=False,
    ),
    optim=dict(
        learning_rate=1e-3, scale_lr_by_batch=False, schedule="cosine", warmup_steps=100,
        grad_clip_norm=1.0,
    ),
    ema=dict(decay=0.999),
    diffusion=dict(
        # Min-SNR-5 loss weighting (Hang et al. 2023): reported ~3x faster
        # convergence, which a CPU-sized budget needs.
        weighting="min_snr",
        # Small latents need less noise (Hoogeboom et al. 2023): on 16x16x3 the
        # base's 0.0195 end leaves 40% of timesteps at SNR < 0.05, where there is
        # little to learn. Stable Diffusion's betas, measured on the demo (2500
        # steps, 2-core CPU): held-out colour accuracy 68.8% -> 83.3% (89.6% in a
        # run pinned to one core), Frechet distance 718 -> 595; shape unchanged
        # (24.0% -> 20.8%).
        linear_start=0.00085, linear_end=0.012,
    ),
    train=dict(
        batch_size=16, num_steps=2500, log_every=50, checkpoint_every=500, sample_every=1250),
    # One half-batch per core: the UNet's forward + backward 1.2x faster, the whole step
    # (text encoder, Adam, EMA) only 43 vs 41 images/s; the demo splits the CPU for stage 1 anyway.
    mesh=dict(cpu_devices=2),
)

# Cross-attention conditioning (text, class, layout) drops the condition 10% of
# the time so that sampling can use classifier-free guidance.
VARIANTS = {
    "shapes_txt2img": dict(
        data=dict(tokenizer=dict(kind="shapes", max_length=32)),
        cond_stage=dict(kind="text", n_embed=128, n_layer=2, vocab_size=64, max_seq_len=32, heads=4,
                        dim_head=32),
        diffusion=dict(cond_dropout=0.1),
        sample=dict(
            prompts=("a large red circle", "a small blue square",
                     "a large green triangle to the left of a small yellow star"),
            guidance_scale=3.0,
        ),
        unet=dict(use_spatial_transformer=True, context_dim=128, transformer_depth=1),
    ),
    "shapes_class": dict(
        cond_stage=dict(kind="class", embed_dim=128, n_classes=37),  # 36 colour x shape + null
        unet=dict(use_spatial_transformer=True, context_dim=128),
        diffusion=dict(cond_dropout=0.1),
        sample=dict(labels=(0, 7, 14, 21, 28, 35), guidance_scale=3.0),
    ),
    "shapes_layout": dict(
        cond_stage=dict(kind="layout", n_embed=128, n_layer=2, heads=4, dim_head=32, vocab_size=300,
                        max_seq_len=16, num_classes=36, grid_size=16, max_objects=3,
                        encode_crop=False),
        unet=dict(use_spatial_transformer=True, context_dim=128),
        diffusion=dict(cond_dropout=0.1),
    ),
    # Concatenated conditions widen the UNet's input: latents (3) + the condition's channels.
    "shapes_semantic": dict(
        concat=dict(kind="segmentation", num_seg_classes=37),
        unet=dict(in_channels=6),
    ),
    # Low-res and inpainting conditions are made from the images in the step,
    # which a latent cache does not keep (training/latent_cache.py refuses them).
    "shapes_sr": dict(
        ldm=dict(cache_latents=False),
        concat=dict(kind="low_res", low_res_size=16),
        unet=dict(in_channels=6),
    ),
    "shapes_inpaint": dict(
        ldm=dict(cache_latents=False),
        concat=dict(kind="inpaint"),
        unet=dict(in_channels=3 + 1 + 3),  # latents, mask, masked image's latents
    ),
}
