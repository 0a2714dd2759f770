"""Normalisation layers that always compute in float32.

The reference implementations upcast GroupNorm to float32 (``GroupNorm32``);
doing the same for every norm keeps bfloat16 training stable and makes
float32 parity exact. Both layers use the two-pass variance, like PyTorch.

GroupNorm has a hand-written backward pass, optionally fused with the SiLU
that follows it in every ResNet block. Autodiff of the plain formula spends
almost as long in the norms and activations of a small conv net as in its
convolutions on a CPU; the fused pair speeds the demo autoencoder's training
step up (``benchmarks/norm_speed.py``; figures in BENCHMARKS.md).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


def _group_mean(sums_BxC: jax.Array, num_groups: int, num_positions: int) -> jax.Array:
  """Per-channel sums over N positions -> each group's mean, repeated per channel (B, C)."""
  batch, channels = sums_BxC.shape
  per_group = channels // num_groups
  group_sums = sums_BxC.reshape(batch, num_groups, per_group).sum(-1)
  return jnp.repeat(group_sums / (num_positions * per_group), per_group, -1)


def _group_stats(x_BxNxC: jax.Array, num_groups: int, epsilon: float) -> tuple[jax.Array, jax.Array]:
  """Per-channel copies (B, C) of each group's mean and 1/std.

  Sums run over the spatial axis first, keeping channels contiguous, then
  over the channels of a group.
  """
  mean_BxC = _group_mean(x_BxNxC.sum(1), num_groups, x_BxNxC.shape[1])
  centred = x_BxNxC - mean_BxC[:, None]
  var_BxC = _group_mean((centred * centred).sum(1), num_groups, x_BxNxC.shape[1])
  return mean_BxC, jax.lax.rsqrt(var_BxC + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _group_norm(x_BxNxC, scale_C, bias_C, num_groups, epsilon, silu):
  y, _ = _group_norm_fwd(x_BxNxC, scale_C, bias_C, num_groups, epsilon, silu)
  return y


def _group_norm_fwd(x_BxNxC, scale_C, bias_C, num_groups, epsilon, silu):
  mean_BxC, rstd_BxC = _group_stats(x_BxNxC, num_groups, epsilon)
  y = (x_BxNxC - mean_BxC[:, None]) * (rstd_BxC * scale_C)[:, None] + bias_C
  # Keep the input, not the normalised tensor: the backward pass recomputes
  # it in the same fused loop that needs it.
  return (jax.nn.silu(y) if silu else y), (x_BxNxC, scale_C, bias_C, mean_BxC, rstd_BxC)


def _group_norm_bwd(num_groups, epsilon, silu, residuals, dy_BxNxC):
  del epsilon
  x, scale_C, bias_C, mean_BxC, rstd_BxC = residuals
  x_hat = (x - mean_BxC[:, None]) * rstd_BxC[:, None]
  if silu:  # d silu(z) / dz = s (1 + z (1 - s)), s = sigmoid(z)
    z = x_hat * scale_C + bias_C
    sig = jax.nn.sigmoid(z)
    dy_BxNxC = dy_BxNxC * sig * (1 + z * (1 - sig))
  dy_sum_BxC = dy_BxNxC.sum(1)
  dy_xhat_BxC = (dy_BxNxC * x_hat).sum(1)
  # dx = rstd (g - mean_group(g) - x_hat mean_group(g x_hat)), g = dy * scale.
  mean_g = _group_mean(dy_sum_BxC * scale_C, num_groups, x.shape[1])
  mean_g_xhat = _group_mean(dy_xhat_BxC * scale_C, num_groups, x.shape[1])
  dx = rstd_BxC[:, None] * (dy_BxNxC * scale_C - mean_g[:, None] - x_hat * mean_g_xhat[:, None])
  return dx, dy_xhat_BxC.sum(0), dy_sum_BxC.sum(0)


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


def group_norm(
    x_BxHxWxC: jax.Array,
    scale_C: jax.Array,
    bias_C: jax.Array,
    num_groups: int,
    epsilon: float,
    silu: bool = False,
) -> jax.Array:
  """GroupNorm over all axes but the first (batch) and last (channels), then
  optionally SiLU; float32 in and out. Any number of middle axes."""
  if x_BxHxWxC.shape[-1] % num_groups:
    raise ValueError(f"GroupNorm: {x_BxHxWxC.shape[-1]} channels do not split into {num_groups} groups")
  flat = x_BxHxWxC.reshape(x_BxHxWxC.shape[0], -1, x_BxHxWxC.shape[-1])
  return _group_norm(flat, scale_C, bias_C, num_groups, epsilon, silu).reshape(x_BxHxWxC.shape)


class GroupNorm(nn.Module):
  """GroupNorm computed in float32, returned in the input's dtype; ``silu``
  applies SiLU (= swish) to the output in the same fused pass.

  Parameters ``scale`` and ``bias`` as in ``flax.linen.GroupNorm``.
  """

  num_groups: int = 32
  epsilon: float = 1e-6
  silu: bool = False
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (channels,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
    f32 = jnp.float32
    y = group_norm(x.astype(f32), scale.astype(f32), bias.astype(f32), self.num_groups, self.epsilon, self.silu)
    return y.astype(x.dtype)


class LayerNorm(nn.LayerNorm):
  """LayerNorm computed in float32, returned in the input's dtype."""

  epsilon: float = 1e-5
  use_fast_variance: bool = False
  dtype: jnp.dtype = jnp.float32

  def __call__(self, x, *args, **kwargs):
    return super().__call__(x.astype(jnp.float32), *args, **kwargs).astype(x.dtype)
