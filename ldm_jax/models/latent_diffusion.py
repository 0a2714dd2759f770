"""A latent diffusion model: UNet ε_θ(z_t, t, τ_θ(y)), conditioning, frozen first stage.

``LatentDiffusion`` ties the pieces together without knowing anything about
schedules or samplers: it turns a data batch into conditioning inputs, drops
them for classifier-free guidance, encodes them, and applies the UNet. Its
``apply`` is the ``denoise_fn(params, x_t, t, cond)`` every sampler takes.

Conditioning routes, as the reference's ``conditioning_key``:

- cross-attention: ``cond_stage`` (text / CLIP / class / layout) → context;
- class embedding added to the time embedding (``adm``): the batch's
  ``label`` as the UNet's ``y`` (``unet.num_classes`` set);
- concatenation with z_t (``concat_kind``): ``low_res`` (super-resolution,
  the low-resolution image), ``inpaint`` (mask + first-stage latent of the
  masked image: SD's 9-channel inpainting layout ``[z_t, mask, z_masked]``),
  ``segmentation`` (one-hot map through a spatial rescaler);
- ``hybrid`` is simply both a cross-attention stage and a concat kind.

Parameter layout: ``params = {"unet", ["cond"], ["concat"]}`` are trained;
``frozen = {"first_stage", ["cond"]}`` are not (a frozen CLIP goes there).
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models.autoencoder import AutoencoderKL
from ldm_jax.models.cond_stage import CondStage
from ldm_jax.models.first_stage import decode_latents, encode_latents
from ldm_jax.models.unet import UNetModel
from ldm_jax.models.vq import VQModel

CONCAT_KINDS = ("none", "low_res", "inpaint", "segmentation")
# Which batch field feeds each cross-attention encoder kind.
_COND_KEYS = {"text": "tokens", "clip": "tokens", "class": "label", "layout": "layout_tokens"}


def corners_to_xywh(boxes_BxOx4: np.ndarray) -> np.ndarray:
  """The input pipeline's boxes (ymin, xmin, ymax, xmax), as TFDS stores them,
  to the layout encoder's (x0, y0, w, h); padding boxes stay zero."""
  ymin, xmin, ymax, xmax = np.moveaxis(np.asarray(boxes_BxOx4, np.float32), -1, 0)
  return np.stack([xmin, ymin, xmax - xmin, ymax - ymin], axis=-1)


def nearest_downsample(mask_BxHxWx1: jax.Array, size: tuple[int, int]) -> jax.Array:
  """PyTorch's ``interpolate(mode="nearest")``, as the references resize inpainting masks:
  output pixel i reads input pixel floor(i * H / h) (``jax.image.resize`` samples pixel centres,
  which picks other pixels along mask edges)."""
  (h, w), (H, W) = size, mask_BxHxWx1.shape[1:3]
  rows, cols = (np.arange(h) * H) // h, (np.arange(w) * W) // w
  return mask_BxHxWx1[:, rows][:, :, cols]


@dataclasses.dataclass(frozen=True)
class LatentDiffusion:
  """The stage-2 model; hashable, so it can close over jitted functions."""

  unet: UNetModel
  first_stage: AutoencoderKL | VQModel
  cond_stage: CondStage
  concat_kind: str = "none"
  concat_stage: CondStage | None = None  # rescaler for low_res / segmentation maps
  use_label_emb: bool = False  # feed batch "label" to the UNet's class embedding
  null_label: int = 0  # the UNet class embedding's null class (CFG)
  num_seg_classes: int = 0
  low_res_size: int = 0  # side of the low-resolution image (super-resolution)
  # Inpainting channel order: SD's [z_t, mask, masked latent] (False) or the
  # paper's inpainting LDM's [z_t, masked latent, mask] (True).
  inpaint_latent_first: bool = False
  scale_factor: float = 1.0

  def __post_init__(self):
    if self.concat_kind not in CONCAT_KINDS:
      raise ValueError(f"concat_kind must be one of {CONCAT_KINDS}, got {self.concat_kind!r}")

  # ------------------------------------------------------------------ shapes
  @property
  def latent_channels(self) -> int:
    return self.first_stage.latent_channels

  @property
  def downsample_factor(self) -> int:
    return self.first_stage.downsample_factor

  def concat_channels(self) -> int:
    if self.concat_kind == "none":
      return 0
    if self.concat_kind == "inpaint":
      return 1 + self.latent_channels
    if self.concat_stage is None:
      raise ValueError(f"concat_kind {self.concat_kind!r} needs a concat stage (spatial rescaler)")
    return self.concat_stage.output_dim

  def check_consistency(self, image_size: int) -> None:
    """Fails at start when the pieces cannot work together; names both values."""
    f = self.downsample_factor
    if image_size % f:
      raise ValueError(f"image size {image_size} is not divisible by the first stage's downsampling factor {f}")
    want_in = self.latent_channels + self.concat_channels()
    if self.unet.in_channels != want_in:
      raise ValueError(
          f"unet.in_channels={self.unet.in_channels} but the first stage gives {self.latent_channels} latent "
          f"channels + {self.concat_channels()} concat channels ({self.concat_kind}) = {want_in}"
      )
    if self.unet.out_channels != self.latent_channels:
      raise ValueError(
          f"unet.out_channels={self.unet.out_channels} but the first stage's latents have "
          f"{self.latent_channels} channels"
      )
    if self.cond_stage.mode == "crossattn":
      if self.unet.context_dim != self.cond_stage.output_dim:
        raise ValueError(
            f"unet.context_dim={self.unet.context_dim} but the {self.cond_stage.kind} encoder outputs "
            f"{self.cond_stage.output_dim}-dim context"
        )
    elif self.unet.context_dim is not None and self.unet.use_spatial_transformer:
      raise ValueError(f"unet.context_dim={self.unet.context_dim} but the model has no cross-attention encoder")
    if self.use_label_emb and not self.unet.num_classes:
      raise ValueError("use_label_emb needs unet.num_classes")

  # ------------------------------------------------------------------ inputs
  @property
  def cond_key(self) -> str | None:
    return _COND_KEYS.get(self.cond_stage.kind) if self.cond_stage.mode == "crossattn" else None

  def host_inputs(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The conditioning inputs of a host batch (before it goes to devices)."""
    out = {}
    if self.cond_key == "layout_tokens":
      out["layout_tokens"] = self.cond_stage.module.tokenize(
          corners_to_xywh(batch["boxes"]), batch["box_labels"], batch["num_objects"])
    elif self.cond_key is not None and "context" in batch and not self.cond_stage.trainable:
      out["context"] = batch["context"]  # precomputed by the frozen encoder (precompute_latents.py --with_context)
    elif self.cond_key is not None:
      if self.cond_key not in batch:
        raise KeyError(f"the {self.cond_stage.kind} encoder needs batch field {self.cond_key!r}; got {sorted(batch)}")
      out[self.cond_key] = batch[self.cond_key]
    if self.use_label_emb:
      out["label"] = batch["label"]
    if self.concat_kind == "segmentation":
      out["segmentation"] = batch["segmentation"]
    # Made by the input pipeline (data.conditioning); without them derive_inputs makes them on device.
    if self.concat_kind == "low_res" and "low_res" in batch:
      out["low_res"] = batch["low_res"]
    if self.concat_kind == "inpaint" and "mask" in batch:
      out["mask"] = batch["mask"]
    return out

  def null_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
    """The unconditional counterpart of ``inputs`` (classifier-free guidance)."""
    out = dict(inputs)
    if self.cond_key is not None:
      # The null condition depends only on the shape (works on traced inputs).
      shaped_like = np.zeros(np.shape(inputs[self.cond_key]), np.int32)
      out[self.cond_key] = jnp.asarray(self.cond_stage.unconditional(shaped_like))
    if self.use_label_emb:
      out["label"] = jnp.full_like(inputs["label"], self.null_label)
    for key in ("low_res", "segmentation_onehot", "mask", "masked_image"):
      if key in out:
        out[key] = jnp.zeros_like(out[key])
    return out

  def drop_inputs(self, drop_B: jax.Array, inputs: dict[str, Any], *, drop_concat: bool = False) -> dict:
    """Replaces the condition of the examples where ``drop_B`` is True by the
    null one (classifier-free guidance training); concat inputs only when
    ``drop_concat``."""
    if not inputs:
      return inputs
    null = self.null_inputs(inputs)
    concat_keys = ("low_res", "segmentation_onehot", "mask", "masked_image")

    def pick(key, a, b):
      if key in concat_keys and not drop_concat:
        return a
      return jnp.where(drop_B.reshape((-1,) + (1,) * (a.ndim - 1)), b, a)

    return {k: pick(k, v, null[k]) for k, v in inputs.items()}

  def derive_inputs(self, inputs: dict[str, Any], images: jax.Array, inpaint_mask: jax.Array | None = None) -> dict:
    """Adds inputs computed from the images themselves (on device, in the step).

    A ``low_res`` or ``mask`` already in ``inputs`` (made by the input pipeline) is
    used as it is; otherwise the low-res image is a cubic resize of ``images`` and the
    mask is ``inpaint_mask`` (B, H, W, 1), 1 = hole (see :func:`random_inpaint_masks`;
    none: nothing is masked).
    """
    out = dict(inputs)
    if self.concat_kind == "low_res":
      size = self.low_res_size or images.shape[1] // self.downsample_factor
      if "low_res" in out:
        given = tuple(out["low_res"].shape[1:])
        if given != (size, size, images.shape[-1]):
          raise ValueError(f"the batch's low_res is {given} per example but the model takes ({size}, {size}, "
                           f"{images.shape[-1]}): set data.conditioning.low_res_factor to image size / {size}")
      else:
        out["low_res"] = jax.image.resize(images, (images.shape[0], size, size, images.shape[-1]), "cubic")
    elif self.concat_kind == "inpaint":
      mask = out.get("mask", inpaint_mask)
      if mask is None:
        mask = jnp.zeros((*images.shape[:3], 1), images.dtype)
      elif tuple(mask.shape) != (*images.shape[:3], 1):
        raise ValueError(f"inpainting masks must be (B, H, W, 1) like the images {images.shape}, got {mask.shape}")
      out["mask"], out["masked_image"] = mask, images * (1.0 - mask)
    elif self.concat_kind == "segmentation":
      out["segmentation_onehot"] = jax.nn.one_hot(out.pop("segmentation"), self.num_seg_classes, dtype=jnp.float32)
    return out

  # ------------------------------------------------------------------ encode
  def encode_images(self, frozen: Any, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """Images → scaled latents ``scale_factor * E(x)``."""
    return self.scale_factor * encode_latents(self.first_stage, frozen["first_stage"], images, rng)

  def decode_latents(self, frozen: Any, z: jax.Array) -> jax.Array:
    """Scaled latents → images, clipped to [-1, 1]."""
    return jnp.clip(decode_latents(self.first_stage, frozen["first_stage"], z / self.scale_factor), -1.0, 1.0)

  def encode_cond(self, params: Any, frozen: Any, inputs: dict[str, Any], *, train: bool = False) -> dict:
    """Conditioning inputs → what the UNet takes: ``context``, ``concat``, ``y``."""
    cond: dict[str, Any] = {}
    if self.cond_key is not None and "context" in inputs:
      cond["context"] = inputs["context"]
    elif self.cond_key is not None:
      variables = params["cond"] if self.cond_stage.trainable else frozen["cond"]
      cond["context"] = self.cond_stage.encode(variables, inputs[self.cond_key])
    if self.use_label_emb:
      cond["y"] = inputs["label"]
    if self.concat_kind == "inpaint":
      z_masked = self.encode_images(frozen, inputs["masked_image"])
      mask = nearest_downsample(inputs["mask"], z_masked.shape[1:3])
      parts = [z_masked, mask] if self.inpaint_latent_first else [mask, z_masked]
      cond["concat"] = jnp.concatenate(parts, axis=-1)
    elif self.concat_kind in ("low_res", "segmentation"):
      source = inputs["low_res" if self.concat_kind == "low_res" else "segmentation_onehot"]
      variables = params.get("concat") if self.concat_stage.trainable else None
      cond["concat"] = self.concat_stage.encode(variables or {"params": {}}, source)
    return cond

  # ------------------------------------------------------------------ network
  def apply(self, params: Any, x_t: jax.Array, t_B: jax.Array, cond: dict, *, train: bool = False, rngs=None):
    """``denoise_fn``: the UNet's output (eps, x0 or v) at ``(x_t, t)``."""
    x = x_t if "concat" not in cond else jnp.concatenate([x_t, cond["concat"].astype(x_t.dtype)], axis=-1)
    return self.unet.apply(
        params["unet"], x, t_B, cond.get("context"), cond.get("y"), train=train, rngs=rngs
    ).astype(jnp.float32)


def random_inpaint_masks(rng: jax.Array, shape_BxHxW: tuple[int, int, int]) -> jax.Array:
  """Random rectangular holes (1 = to inpaint), 10–60% of each side, (B, H, W, 1)."""
  b, h, w = shape_BxHxW
  k_size, k_pos = jax.random.split(rng)
  frac = jax.random.uniform(k_size, (b, 2), minval=0.1, maxval=0.6)
  size = frac * jnp.asarray([h, w], jnp.float32)
  start = jax.random.uniform(k_pos, (b, 2)) * (jnp.asarray([h, w], jnp.float32) - size)
  ys, xs = jnp.arange(h)[None, :, None], jnp.arange(w)[None, None, :]
  inside = (
      (ys >= start[:, 0, None, None]) & (ys < (start[:, 0] + size[:, 0])[:, None, None])
      & (xs >= start[:, 1, None, None]) & (xs < (start[:, 1] + size[:, 1])[:, None, None])
  )
  return inside[..., None].astype(jnp.float32)
