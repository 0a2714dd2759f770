"""The time-conditional UNet of LDM and Stable Diffusion (``openaimodel.UNetModel``).

One module covers the whole reference family: unconditional and
concat-conditioned LDMs (legacy ``AttentionBlock``), class-conditional models
(``num_classes``), cross-attention models (``SpatialTransformer``: LDM
txt2img, SD v1 with 1x1-conv projections, SD v2 with linear ones), FiLM-style
``use_scale_shift_norm`` and ``resblock_updown``. Fields are the reference's
hyper-parameters, so a YAML ``unet_config.params`` maps on one to one, and
parameter paths are the reference state-dict names (``input_blocks_1_1/...``).
"""

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.nn.attention import Implementation
from ldm_jax.nn.embeddings import timestep_embedding
from ldm_jax.nn.norm import GroupNorm
from ldm_jax.nn.transformer import SpatialTransformer
from ldm_jax.nn.unet_blocks import UNET_NORM_EPS, AttentionBlock, Downsample, ResBlock, Upsample

# "full" keeps only each block's inputs; "save_dots" also keeps the outputs of
# matmuls without batch dimensions (the dense projections) but recomputes
# convolutions, norms and the (large, batched) attention matrices.
REMAT_POLICIES = {
    "none": None,
    "full": None,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def attention_heads(
    ch: int,
    *,
    num_heads: int,
    num_head_channels: int,
    num_heads_upsample: int = -1,
    legacy: bool = True,
    use_spatial_transformer: bool = False,
    upsample: bool = False,
) -> tuple[int, int]:
  """``(heads, head_dim)`` of the attention layer the reference builds on ``ch`` channels.

  Follows ``UNetModel.__init__`` exactly, including its quirks: with
  ``num_head_channels`` set the head count is ``ch // num_head_channels``;
  ``legacy`` changes how the head size is passed on; ``num_heads_upsample``
  only reaches legacy ``AttentionBlock``s in the output blocks.
  """
  if num_head_channels == -1:
    dim_head = ch // num_heads
  else:
    num_heads, dim_head = ch // num_head_channels, num_head_channels
  if legacy:
    dim_head = ch // num_heads if use_spatial_transformer else num_head_channels
  if use_spatial_transformer:
    return num_heads, dim_head
  if dim_head != -1:
    heads = ch // dim_head
  elif upsample and num_heads_upsample != -1:
    heads = num_heads_upsample
  else:
    heads = num_heads
  return heads, ch // heads


class UNetModel(nn.Module):
  """ε/x0/v-prediction UNet, NHWC. See the module docstring.

  ``__call__(x, timesteps, context, y, context_mask, train=...)``:
  ``timesteps`` is (B,) or a scalar (possibly fractional). ``context``
  (B, L, context_dim) feeds the cross-attention keys/values; the optional
  boolean ``context_mask`` (B, L), True for real tokens, hides padding tokens
  from them (the reference SD does not mask: leave it None to match it; every
  row needs at least one True). ``y`` holds the integer class labels (B,)
  when ``num_classes`` is set. Concat conditioning just widens
  ``in_channels``. ``train=True`` with ``dropout > 0`` needs
  ``rngs={"dropout": key}``. ``image_size`` is unused, as in the reference.
  """

  in_channels: int
  model_channels: int
  out_channels: int
  num_res_blocks: int | Sequence[int]
  attention_resolutions: Sequence[int]
  image_size: int | None = None
  dropout: float = 0.0
  channel_mult: Sequence[int] = (1, 2, 4, 8)
  conv_resample: bool = True
  num_classes: int | None = None
  num_heads: int = -1
  num_head_channels: int = -1
  num_heads_upsample: int = -1
  use_scale_shift_norm: bool = False
  resblock_updown: bool = False
  use_new_attention_order: bool = False
  use_spatial_transformer: bool = False
  transformer_depth: int = 1
  context_dim: int | None = None
  use_linear_in_transformer: bool = False
  legacy: bool = True
  norm_num_groups: int = 32
  attention_impl: Implementation = "auto"
  remat_policy: str = "none"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
      self,
      x_BxHxWxC: jax.Array,
      timesteps_B: jax.Array,
      context_BxLxD: jax.Array | None = None,
      y_B: jax.Array | None = None,
      context_mask_BxL: jax.Array | None = None,
      *,
      train: bool = False,
  ) -> jax.Array:
    self._check_fields()
    self._check_inputs(x_BxHxWxC, context_BxLxD, y_B, context_mask_BxL)
    num_res_blocks = self._num_res_blocks()
    emb = self._embed(timesteps_B, y_B, x_BxHxWxC.shape[0])

    def res(h, ch, name, **updown):
      return self._layer(
          ResBlock, out_channels=ch, dropout=self.dropout, use_scale_shift_norm=self.use_scale_shift_norm,
          norm_num_groups=self.norm_num_groups, deterministic=not train, name=name, **updown,
      )(h, emb)

    def attend(h, ch, name, upsample=False):
      return self._attention(h, ch, context_BxLxD, context_mask_BxL, name, upsample)

    h = self._conv(self.model_channels, "input_blocks_0_0")(x_BxHxWxC.astype(self.dtype))
    skips, index, ds = [h], 1, 1
    for level, mult in enumerate(self.channel_mult):
      ch = mult * self.model_channels
      for _ in range(num_res_blocks[level]):
        h = res(h, ch, f"input_blocks_{index}_0")
        if ds in self.attention_resolutions:
          h = attend(h, ch, f"input_blocks_{index}_1")
        skips.append(h)
        index += 1
      if level != len(self.channel_mult) - 1:
        name = f"input_blocks_{index}_0"
        if self.resblock_updown:
          h = res(h, ch, name, down=True)
        else:
          h = self._layer(Downsample, use_conv=self.conv_resample, name=name)(h)
        skips.append(h)
        index, ds = index + 1, ds * 2

    h = res(h, ch, "middle_block_0")
    h = attend(h, ch, "middle_block_1")  # the middle block always has attention
    h = res(h, ch, "middle_block_2")

    index = 0
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      ch = mult * self.model_channels
      for i in range(num_res_blocks[level] + 1):
        h = res(jnp.concatenate([h, skips.pop()], axis=-1), ch, f"output_blocks_{index}_0")
        layer = 1
        if ds in self.attention_resolutions:
          h = attend(h, ch, f"output_blocks_{index}_1", upsample=True)
          layer = 2
        if level and i == num_res_blocks[level]:
          name = f"output_blocks_{index}_{layer}"
          if self.resblock_updown:
            h = res(h, ch, name, up=True)
          else:
            h = self._layer(Upsample, use_conv=self.conv_resample, name=name)(h)
          ds //= 2
        index += 1

    h = GroupNorm(self.norm_num_groups, epsilon=UNET_NORM_EPS, silu=True, param_dtype=self.param_dtype, name="out_0")(h)
    h = self._conv(self.out_channels, "out_2", kernel_init=nn.initializers.zeros_init())(h)
    return h.astype(x_BxHxWxC.dtype)

  # -- pieces -------------------------------------------------------------

  def _layer(self, cls: type[nn.Module], **kwargs) -> nn.Module:
    """Builds a block, under ``nn.remat`` when asked; the name stays the same."""
    if self.remat_policy != "none":
      cls = nn.remat(cls, policy=REMAT_POLICIES[self.remat_policy])
    return cls(dtype=self.dtype, param_dtype=self.param_dtype, **kwargs)

  def _conv(self, features: int, name: str, **kwargs) -> nn.Conv:
    return nn.Conv(features, (3, 3), padding=1, dtype=self.dtype, param_dtype=self.param_dtype, name=name, **kwargs)

  def _attention(self, h, ch, context, mask, name: str, upsample: bool) -> jax.Array:
    heads, dim_head = attention_heads(
        ch, num_heads=self.num_heads, num_head_channels=self.num_head_channels,
        num_heads_upsample=self.num_heads_upsample, legacy=self.legacy,
        use_spatial_transformer=self.use_spatial_transformer, upsample=upsample,
    )
    common = dict(norm_num_groups=self.norm_num_groups, attention_impl=self.attention_impl, name=name)
    if self.use_spatial_transformer:
      return self._layer(
          SpatialTransformer, heads=heads, dim_head=dim_head, depth=self.transformer_depth,
          use_linear=self.use_linear_in_transformer, **common,
      )(h, context, mask)
    block = self._layer(AttentionBlock, num_heads=heads, use_new_attention_order=self.use_new_attention_order, **common)
    return block(h)

  def _embed(self, timesteps_B: jax.Array, y_B: jax.Array | None, batch: int) -> jax.Array:
    """Time (+ class) embedding, (B, 4 * model_channels), computed in float32."""
    width = 4 * self.model_channels
    t_B = jnp.broadcast_to(jnp.asarray(timesteps_B), (batch,))
    dense = functools.partial(nn.Dense, width, dtype=jnp.float32, param_dtype=self.param_dtype)
    emb = dense(name="time_embed_2")(nn.silu(dense(name="time_embed_0")(timestep_embedding(t_B, self.model_channels))))
    if self.num_classes is None:
      return emb
    # PyTorch's nn.Embedding initialises N(0, 1).
    label = nn.Embed(
        self.num_classes, width, embedding_init=nn.initializers.normal(1.0), param_dtype=self.param_dtype,
        name="label_emb",
    )(y_B)
    return emb + label.astype(jnp.float32)

  # -- validation ----------------------------------------------------------

  def _num_res_blocks(self) -> tuple[int, ...]:
    if isinstance(self.num_res_blocks, int):
      return (self.num_res_blocks,) * len(self.channel_mult)
    return tuple(self.num_res_blocks)

  def _check_fields(self) -> None:
    problems = []
    if self.num_heads == -1 and self.num_head_channels == -1:
      problems.append("set num_heads or num_head_channels (both are -1)")
    if self.use_spatial_transformer != (self.context_dim is not None):
      problems.append("use_spatial_transformer=True needs context_dim, and context_dim needs use_spatial_transformer")
    if self.remat_policy not in REMAT_POLICIES:
      problems.append(f"remat_policy must be one of {sorted(REMAT_POLICIES)}, got {self.remat_policy!r}")
    if not isinstance(self.num_res_blocks, int) and len(self.num_res_blocks) != len(self.channel_mult):
      problems.append(f"num_res_blocks {tuple(self.num_res_blocks)} needs one entry per channel_mult level")
    if self.num_classes is not None and (not isinstance(self.num_classes, int) or self.num_classes < 1):
      # The reference's "continuous" / "sequential" (ADM vector) variants are not ported.
      problems.append(f"num_classes must be a positive int or None, got {self.num_classes!r}")
    if problems:
      raise ValueError("UNetModel: " + "; ".join(problems))

  def _check_inputs(self, x, context, y, mask) -> None:
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"UNetModel: x must be (B, H, W, {self.in_channels}) NHWC, got shape {x.shape}")
    factor = 2 ** (len(self.channel_mult) - 1)
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f"UNetModel: H and W must be multiples of {factor} (the total downsampling), got {x.shape[1:3]}")
    batch = x.shape[0]
    if self.use_spatial_transformer:
      if context is None or context.ndim != 3 or context.shape[0] != batch or context.shape[-1] != self.context_dim:
        got = None if context is None else context.shape
        raise ValueError(f"UNetModel: context must be (B={batch}, L, {self.context_dim}), got {got}")
    elif context is not None:
      raise ValueError("UNetModel: context given, but this UNet has no cross-attention (use_spatial_transformer=False)")
    if mask is not None and (context is None or mask.shape != context.shape[:2]):
      raise ValueError(f"UNetModel: context_mask must be (B, L) like the context, got {mask.shape}")
    if (y is None) != (self.num_classes is None):
      raise ValueError("UNetModel: pass y if and only if the model is class-conditional (num_classes set)")
    if y is not None and (y.shape != (batch,) or not jnp.issubdtype(y.dtype, jnp.integer)):
      raise ValueError(f"UNetModel: y must be integer class labels of shape ({batch},), got {y.dtype} {y.shape}")


# -- named configurations of the reference models -----------------------------

_SD_V1 = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=(4, 2, 1),
    num_res_blocks=2, channel_mult=(1, 2, 4, 4), num_heads=8, use_spatial_transformer=True, transformer_depth=1,
    context_dim=768, legacy=False,
)
_SD_V2 = {**_SD_V1, "num_heads": -1, "num_head_channels": 64, "use_linear_in_transformer": True, "context_dim": 1024}
# celebahq / ffhq / lsun_bedrooms-ldm-vq-4.yaml share one unconditional UNet.
_VQ_F4 = dict(
    image_size=64, in_channels=3, out_channels=3, model_channels=224, attention_resolutions=(8, 4, 2),
    num_res_blocks=2, channel_mult=(1, 2, 3, 4), num_head_channels=32,
)

UNET_PRESETS: dict[str, dict[str, Any]] = {
    "sd_v1": _SD_V1,  # CompVis v1-inference.yaml
    "sd_v1_inpaint": {**_SD_V1, "in_channels": 9},  # v1-inpainting-inference.yaml
    "sd_v2": _SD_V2,  # Stability-AI v2-inference(-v).yaml
    "sd_v2_inpaint": {**_SD_V2, "in_channels": 9},  # v2-inpainting-inference.yaml
    "celebahq_vq4": _VQ_F4,
    "ffhq_vq4": _VQ_F4,
    "lsun_bedrooms_vq4": _VQ_F4,
    "lsun_churches_kl8": dict(  # lsun_churches-ldm-kl-8.yaml
        image_size=32, in_channels=4, out_channels=4, model_channels=192, attention_resolutions=(1, 2, 4, 8),
        num_res_blocks=2, channel_mult=(1, 2, 2, 4, 4), num_heads=8, use_scale_shift_norm=True,
        resblock_updown=True,
    ),
    # cin256-v2.yaml: classes enter by cross-attention to a 512-d ClassEmbedder
    # token (1001 classes incl. the null class, a cond-stage model), not label_emb.
    "cin256_v2": dict(
        image_size=64, in_channels=3, out_channels=3, model_channels=192, attention_resolutions=(8, 4, 2),
        num_res_blocks=2, channel_mult=(1, 2, 3, 5), num_heads=1, use_spatial_transformer=True,
        transformer_depth=1, context_dim=512,
    ),
    "txt2img_1p4b": {**_SD_V1, "context_dim": 1280},  # txt2img-1p4B-eval.yaml (LDM-BERT context)
    # models/ldm/bsr_sr/config.yaml: z_t + the low-res image. Attention at 16 and 8 as written,
    # though with four levels the downsampling factor only reaches 8.
    "sr_bsr": dict(
        image_size=64, in_channels=6, out_channels=3, model_channels=160, attention_resolutions=(16, 8),
        num_res_blocks=2, channel_mult=(1, 2, 2, 4), num_head_channels=32,
    ),
    # models/ldm/inpainting_big/config.yaml: z_t + masked image's latent + mask.
    "inpainting_big": dict(
        image_size=64, in_channels=7, out_channels=3, model_channels=256, attention_resolutions=(8, 4, 2),
        num_res_blocks=2, channel_mult=(1, 2, 3, 4), num_heads=8, resblock_updown=True,
    ),
    # models/ldm/layout2img-openimages256/config.yaml: cross-attention to the 512-d layout encoder.
    "layout2img": dict(
        image_size=64, in_channels=3, out_channels=3, model_channels=128, attention_resolutions=(8, 4, 2),
        num_res_blocks=2, channel_mult=(1, 2, 3, 4), num_head_channels=32, use_spatial_transformer=True,
        transformer_depth=3, context_dim=512,
    ),
    # models/ldm/semantic_synthesis256/config.yaml: z_t + the rescaled 3-channel segmentation.
    "semantic256": dict(
        image_size=64, in_channels=6, out_channels=3, model_channels=128, attention_resolutions=(32, 16, 8),
        num_res_blocks=2, channel_mult=(1, 4, 8), num_heads=8,
    ),
}


def unet_preset(name: str, **overrides: Any) -> dict[str, Any]:
  """UNetModel fields of a reference model, with ``overrides`` applied (e.g. tiny widths)."""
  if name not in UNET_PRESETS:
    raise ValueError(f"unknown UNet preset {name!r}; available: {sorted(UNET_PRESETS)}")
  unknown = sorted(set(overrides) - set(UNetModel.__dataclass_fields__) - {"parent", "name"})
  if unknown:
    raise ValueError(f"unknown UNetModel fields in overrides: {unknown}")
  return {**UNET_PRESETS[name], **overrides}
