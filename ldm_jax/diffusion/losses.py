"""Training loss of a diffusion model (LDM ``p_losses`` / ``loss_simple``) and its logging.

The model call lives with the caller (the stage-2 train step): these are pure
functions of the model output, so they work for any network and any
conditioning, and the same code computes train and eval losses.
"""

from typing import Literal

import jax
import jax.numpy as jnp

from ldm_jax.diffusion.parameterization import alpha_bar_at, canonical_prediction_type, training_target
from ldm_jax.diffusion.schedules import DiffusionSchedule

LOSS_TYPES = ("l2", "l1")
WEIGHTINGS = ("none", "min_snr")


TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


def check_timestep_sampling(kind: str, scale: float) -> None:
  """Raises ``ValueError`` naming what :func:`sample_timesteps` cannot draw."""
  if kind not in TIMESTEP_SAMPLINGS:
    raise ValueError(f"unknown timestep_sampling {kind!r}; expected one of {TIMESTEP_SAMPLINGS}")
  if kind == "logit_normal" and not scale > 0:
    raise ValueError(f"timestep_scale must be > 0 for logit_normal sampling, got {scale}")


def sample_timesteps(
    rng: jax.Array,
    batch: int,
    num_timesteps: int,
    kind: Literal["uniform", "logit_normal"] = "uniform",
    loc: float = 0.0,
    scale: float = 1.0,
) -> jax.Array:
  """Integer training timesteps in ``[0, num_timesteps)``, shape ``(batch,)``.

  ``uniform``: the reference's ``t ~ U{0..T-1}``. ``logit_normal``: ``t =
  floor(T * sigmoid(loc + scale * n))``, ``n ~ N(0, 1)`` (Esser et al. 2024,
  SD3), which spends the steps on the middle noise levels where content
  forms; ``loc < 0`` moves them towards less noise. The density multiplies
  whatever loss weighting is also configured.
  """
  check_timestep_sampling(kind, scale)
  if kind == "uniform":
    return jax.random.randint(rng, (batch,), 0, num_timesteps, dtype=jnp.int32)
  u = jax.nn.sigmoid(loc + scale * jax.random.normal(rng, (batch,), jnp.float32))
  return jnp.clip(jnp.floor(u * num_timesteps), 0, num_timesteps - 1).astype(jnp.int32)


def min_snr_weight(alpha_bar_B: jax.Array, prediction_type: str, gamma: float = 5.0) -> jax.Array:
  """Min-SNR-gamma loss weights (Hang et al. 2023), expressed for each parameterisation.

  The paper's weight ``min(SNR, gamma)`` is for an x0 loss; an eps loss is an
  x0 loss divided by SNR and a v loss one divided by ``SNR + 1``.
  """
  snr = alpha_bar_B / (1.0 - alpha_bar_B)
  clipped = jnp.minimum(snr, gamma)
  if prediction_type == "eps":
    return clipped / snr
  if prediction_type == "x0":
    return clipped
  return clipped / (snr + 1.0)


def diffusion_loss(
    model_output: jax.Array,
    x0: jax.Array,
    noise: jax.Array,
    t_B: jax.Array,
    schedule: DiffusionSchedule,
    *,
    prediction_type: str,
    loss_type: Literal["l2", "l1"] = "l2",
    weighting: Literal["none", "min_snr"] = "none",
    min_snr_gamma: float = 5.0,
) -> jax.Array:
  """Per-example loss ``(B,)``: the mean over non-batch axes of ``|target - output|^p``.

  ``model_output`` is the network's output at ``q_sample(schedule, x0, t_B, noise)``;
  it is cast to float32 first, so bfloat16 networks get a float32 loss.
  """
  prediction_type = canonical_prediction_type(prediction_type)
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
  if weighting not in WEIGHTINGS:
    raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
  if model_output.shape != x0.shape or noise.shape != x0.shape:
    raise ValueError(
        f"model_output {model_output.shape}, x0 {x0.shape} and noise {noise.shape} must have the same shape"
    )
  alpha_bar = alpha_bar_at(schedule, t_B, x0.ndim)
  error = model_output.astype(jnp.float32) - training_target(x0, noise, alpha_bar, prediction_type)
  per_element = jnp.square(error) if loss_type == "l2" else jnp.abs(error)
  loss_B = jnp.mean(per_element, axis=tuple(range(1, x0.ndim)))
  if weighting == "min_snr":
    loss_B = loss_B * min_snr_weight(alpha_bar.reshape(-1), prediction_type, min_snr_gamma)
  return loss_B


def loss_by_timestep_bucket(
    loss_B: jax.Array, t_B: jax.Array, num_timesteps: int, num_buckets: int = 10
) -> tuple[jax.Array, jax.Array]:
  """Mean loss and example count per equal-width timestep bucket, computed on device.

  Returns ``(means, counts)`` of shape ``(num_buckets,)``; buckets with no
  example have mean NaN (so averaging over steps must skip NaNs).
  """
  bucket_B = (jnp.asarray(t_B, jnp.int32) * num_buckets) // num_timesteps
  sums = jax.ops.segment_sum(loss_B.astype(jnp.float32), bucket_B, num_segments=num_buckets)
  counts = jax.ops.segment_sum(jnp.ones_like(loss_B, jnp.int32), bucket_B, num_segments=num_buckets)
  means = jnp.where(counts > 0, sums / jnp.maximum(counts, 1), jnp.nan)
  return means, counts
