"""GroupNorm's hand-written backward pass against autodiff of the plain formula."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.nn.norm import GroupNorm, group_norm


def plain_group_norm(x, scale, bias, num_groups, epsilon, silu):
  """Textbook GroupNorm (two-pass variance), then SiLU; differentiated by JAX."""
  g = x.reshape(x.shape[0], -1, num_groups, x.shape[-1] // num_groups)
  mean = g.mean((1, 3), keepdims=True)
  var = ((g - mean) ** 2).mean((1, 3), keepdims=True)
  y = ((g - mean) / jnp.sqrt(var + epsilon)).reshape(x.shape) * scale + bias
  return y * jax.nn.sigmoid(y) if silu else y


@pytest.mark.parametrize("shape,num_groups", [((2, 5, 6, 16), 8), ((3, 7, 12), 4), ((2, 3, 4, 8), 1), ((2, 9, 6), 6)])
@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_value_and_gradients_match_autodiff_in_float64(shape, num_groups, silu):
  keys = jax.random.split(jax.random.key(0), 4)
  channels = shape[-1]
  with jax.enable_x64(True):
    f64 = jnp.float64
    x = jax.random.normal(keys[0], shape, f64) * 3.0 + 1.5  # off-centre, not unit scale
    scale = jax.random.normal(keys[1], (channels,), f64)
    bias = jax.random.normal(keys[2], (channels,), f64)
    cotangent = jax.random.normal(keys[3], shape, f64)

    def weighted(fn):
      return lambda x, s, b: jnp.sum(fn(x, s, b, num_groups, 1e-6, silu) * cotangent)

    np.testing.assert_allclose(
        group_norm(x, scale, bias, num_groups, 1e-6, silu), plain_group_norm(x, scale, bias, num_groups, 1e-6, silu),
        rtol=0, atol=1e-12,
    )
    ours = jax.grad(weighted(group_norm), argnums=(0, 1, 2))(x, scale, bias)
    reference = jax.grad(weighted(plain_group_norm), argnums=(0, 1, 2))(x, scale, bias)
    for name, a, b in zip(("x", "scale", "bias"), ours, reference):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10, err_msg=f"d/d{name}")


def test_module_matches_flax_group_norm_then_silu():
  x = jax.random.normal(jax.random.key(1), (2, 4, 4, 32)) * 2.0 + 0.5
  ours = GroupNorm(num_groups=8, epsilon=1e-5, silu=True)
  flax_norm = nn.GroupNorm(num_groups=8, epsilon=1e-5)
  params = flax_norm.init(jax.random.key(2), x)
  # Random affine parameters so that scale and bias matter.
  params = jax.tree.map(lambda p: jax.random.normal(jax.random.key(3), p.shape), params)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(2), x)) == jax.tree.map(jnp.shape, params)
  np.testing.assert_allclose(ours.apply(params, x), nn.silu(flax_norm.apply(params, x)), rtol=1e-5, atol=1e-5)


def test_module_keeps_the_input_dtype_and_rejects_uneven_groups():
  x = jax.random.normal(jax.random.key(4), (1, 2, 2, 12)).astype(jnp.bfloat16)
  norm = GroupNorm(num_groups=4)
  assert norm.apply(norm.init(jax.random.key(0), x), x).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="12 channels do not split into 5 groups"):
    GroupNorm(num_groups=5).init(jax.random.key(0), x)
