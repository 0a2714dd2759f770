"""Evaluating image-conditioned models on held-out images: each real image is the target of one sample.

- super-resolution: the low-resolution input is the held-out image bicubically
  downsampled exactly as training made its inputs (``LatentDiffusion.derive_inputs``);
  the sample is compared with the original (PSNR, SSIM; FID / IS over all samples);
- inpainting: each held-out image gets a fixed random rectangular hole
  (``random_inpaint_masks``, 10-60% of each side) drawn from ``(mask_seed, image index)``,
  so every run and every model sees the same masks; the inpainted sample is compared
  with the original (LPIPS; FID over all samples).

Sample ``i`` starts from the noise of ``(seed, i)`` as in ``image_sources.sample_batches``.
"""

from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.data.image_io import to_uint8
from ldm_jax.models.latent_diffusion import LatentDiffusion, random_inpaint_masks
from ldm_jax.pipeline import LDMPipeline

TASKS = {"low_res": "super_resolution", "inpaint": "inpainting"}


def task_of(model: LatentDiffusion) -> str | None:
  """``"super_resolution"``, ``"inpainting"`` or None (not conditioned on an image)."""
  return TASKS.get(model.concat_kind)


def eval_masks(mask_seed: int, first_index: int, n: int, height: int, width: int) -> np.ndarray:
  """(n, H, W) float32 holes (1 = inpaint) of held-out images ``first_index .. first_index + n - 1``."""
  key = jax.random.key(mask_seed)
  masks = [random_inpaint_masks(jax.random.fold_in(key, first_index + i), (1, height, width)) for i in range(n)]
  return np.concatenate([np.asarray(m[..., 0], np.float32) for m in masks])


def low_res_inputs(model: LatentDiffusion, images_BxHxWx3: np.ndarray) -> np.ndarray:
  """The super-resolution input of held-out images in [-1, 1], as training derives it."""
  return np.asarray(model.derive_inputs({}, jnp.asarray(images_BxHxWx3, jnp.float32))["low_res"])


def paired_samples(
    pipeline: LDMPipeline,
    batches: Iterable[np.ndarray],
    *,
    batch_size: int,
    mask_seed: int = 0,
    **sample_kw,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
  """``(real uint8, sample uint8, masks or None)`` per batch of held-out images ([-1, 1] floats).

  Every call samples ``batch_size`` images (the last batch is padded), so one program serves all.
  """
  task = task_of(pipeline.model)
  if task is None:
    raise ValueError(f"the model's concat kind {pipeline.model.concat_kind!r} is not an image-conditioned task "
                     f"({sorted(TASKS)})")
  if pipeline.model.cond_key is not None or pipeline.model.use_label_emb:
    raise ValueError("held-out evaluation of image-conditioned models covers models without text or class "
                     "conditioning")
  index = 0
  for images in batches:
    images = np.asarray(images, np.float32)
    n = len(images)
    padded = np.concatenate([images, np.repeat(images[-1:], batch_size - n, axis=0)]) if n < batch_size else images
    height, width = images.shape[1:3]
    kw = dict(sample_kw, num=batch_size, first_index=index, height=height, width=width)
    masks = None
    if task == "super_resolution":
      out = pipeline.generate({}, low_res=low_res_inputs(pipeline.model, padded), **kw)
    else:
      masks = eval_masks(mask_seed, index, n, height, width)
      padded_masks = np.concatenate([masks, np.repeat(masks[-1:], batch_size - n, axis=0)])
      out = pipeline.generate({}, init_images=padded, mask=padded_masks, **kw)
    yield to_uint8(images), out[:n], masks
    index += n
