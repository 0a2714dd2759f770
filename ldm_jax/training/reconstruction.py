"""Encoding and decoding images with a trained first stage.

:func:`make_reconstruct_fn` is the one compiled program that both the
stage-1 trainer (validation PSNR/LPIPS, reconstruction grids, the latent
scale factor) and the ``reconstruct.py`` / ``evaluate.py`` commands use.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.evaluation.image_metrics import psnr
from ldm_jax.models.autoencoder import AutoencoderKL, DiagonalGaussian
from ldm_jax.models.lpips import make_lpips_fn
from ldm_jax.models.vq import VQModel

ReconstructFn = Callable[[Any, Any, jax.Array], dict[str, jax.Array]]


def make_reconstruct_fn(model: AutoencoderKL | VQModel) -> ReconstructFn:
  """Jitted ``fn(ae_params, lpips_params | None, images) -> dict`` of

  - ``reconstruction``: D(E(x)) clipped to [-1, 1] (the posterior mean for
    KL, the quantised latent for VQ);
  - ``latent_mean``, ``latent_var``: the posterior's moments (KL) or the
    pre-quantisation latent and zeros (VQ): what the LDM diffuses;
  - ``psnr`` (and ``lpips`` with LPIPS params): per image.
  """

  def fn(ae_params, lpips_params, x_BxHxWxC):
    variables = {"params": ae_params}
    latent = model.apply(variables, x_BxHxWxC, method=model.encode)
    if isinstance(latent, DiagonalGaussian):
      mean, var = latent.mean, latent.var
    else:
      mean, var = latent.astype(jnp.float32), jnp.zeros(latent.shape, jnp.float32)
    x_rec = jnp.clip(model.apply(variables, mean, method=model.decode).astype(jnp.float32), -1.0, 1.0)
    out = {"reconstruction": x_rec, "latent_mean": mean, "latent_var": var, "psnr": psnr(x_BxHxWxC, x_rec)}
    if lpips_params is not None:
      out["lpips"] = make_lpips_fn(lpips_params)(x_BxHxWxC, x_rec)
    return out

  return jax.jit(fn)


def latent_scale_factor(mean: np.ndarray, var: np.ndarray) -> float:
  """1 / std of latents z ~ N(mean, var) pooled over all elements (the
  reference's ``scale_by_std``), in float64.

  Var z = Var(mean) + E[var]: the expectation over the posterior noise,
  so the factor is the same on every run and process (the reference draws
  one sample; with ``var = 0``, as for VQ, both are 1 / std(mean)).
  """
  mean = np.asarray(mean, np.float64)
  variance = mean.var() + np.asarray(var, np.float64).mean()
  if not np.isfinite(variance) or variance <= 0:
    raise ValueError(f"latents have variance {variance}: cannot compute a scale factor")
  return float(1.0 / np.sqrt(variance))
