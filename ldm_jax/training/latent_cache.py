"""Precomputed first-stage latents, so stage 2 does not re-encode every step.

For a KL first stage the cache keeps the posterior's mean and log-variance,
and the train step still draws a fresh sample each time (as the reference
does); a VQ first stage's pre-quantisation latent is deterministic. The
conditioning fields of every example are kept next to the latents. Only
datasets without random crops/flips can be cached (the cache is one fixed
view of each image), and concat conditioning derived from pixels
(super-resolution, inpainting) needs the images: both are refused.

Each process caches its own slice of the split and iterates over it with
its own checkpointable grain iterator.
"""

import logging
import os
from collections.abc import Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models.autoencoder import DiagonalGaussian
from ldm_jax.models.latent_diffusion import LatentDiffusion


class _ArraySource:
  """A random-access grain source over equally long arrays."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    self._arrays = arrays
    self._len = len(next(iter(arrays.values())))

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in self._arrays.items()}


def check_cacheable(model: LatentDiffusion, data_config) -> None:
  if model.concat_kind in ("low_res", "inpaint"):
    raise ValueError(f"cache_latents cannot be used with concat kind {model.concat_kind!r}: it needs the images")
  if data_config.get("random_flip", False) or data_config.get("crop", "center") == "random":
    raise ValueError("cache_latents needs a deterministic view of each image: set data.crop=center, random_flip=False")


def build_latent_cache(
    model: LatentDiffusion,
    frozen,
    host_batches,
    prepare: Callable[[dict], dict],
    path: str,
) -> dict[str, np.ndarray]:
  """Encodes every batch of ``host_batches`` once; saves and returns the arrays.

  ``prepare`` turns a host batch into ``{"image", conditioning fields...}``.
  A cache file that already exists is loaded instead.
  """
  if os.path.exists(path):
    with np.load(path) as data:
      return dict(data)

  @jax.jit
  def moments(frozen, images):
    out = model.first_stage.apply(frozen["first_stage"], images, method=model.first_stage.encode)
    if isinstance(out, DiagonalGaussian):
      return {"latent_mean": out.mean, "latent_logvar": out.logvar}
    return {"latent_mean": out}

  chunks: dict[str, list[np.ndarray]] = {}
  for batch in host_batches:
    batch = prepare(batch)
    encoded = jax.device_get(moments(frozen, jnp.asarray(batch.pop("image"))))
    for k, v in {**encoded, **batch}.items():
      chunks.setdefault(k, []).append(np.asarray(v))
  if not chunks:
    raise ValueError("the dataset split to cache is empty")
  arrays = {k: np.concatenate(v) for k, v in chunks.items()}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)  # atomic: a killed run never leaves half a cache
  logging.info("cached %d latents in %s", len(arrays["latent_mean"]), path)
  return arrays


def cached_iterator(arrays: dict[str, np.ndarray], batch_size: int, seed: int):
  """Shuffled (fresh order each epoch), repeating, checkpointable batches."""
  if len(next(iter(arrays.values()))) < batch_size:
    raise ValueError(f"the latent cache holds fewer examples than one batch ({batch_size})")
  ds = grain.MapDataset.source(_ArraySource(arrays)).shuffle(seed=seed).repeat().batch(batch_size, drop_remainder=True)
  return ds.to_iter_dataset().__iter__()
