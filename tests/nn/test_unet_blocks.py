"""UNet blocks against float64 NumPy references written from the reference code's semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.nn.unet_blocks import AttentionBlock, Downsample, Upsample

B, H, W, C = 2, 4, 6, 16
GROUPS = 4


def _group_norm(x_BxTxC, scale, bias, eps=1e-5):
  b, t, c = x_BxTxC.shape
  g = x_BxTxC.reshape(b, t, GROUPS, c // GROUPS)
  g = (g - g.mean(axis=(1, 3), keepdims=True)) / np.sqrt(g.var(axis=(1, 3), keepdims=True) + eps)
  return g.reshape(b, t, c) * scale + bias


def attention_block_reference(x_BxHxWxC, p, heads: int, new_order: bool) -> np.ndarray:
  """openaimodel.AttentionBlock in float64, in the reference's (B, C, T) layout."""
  f64 = lambda a: np.asarray(a, np.float64)
  x = f64(x_BxHxWxC).reshape(B, H * W, C)
  h = _group_norm(x, f64(p["norm"]["scale"]), f64(p["norm"]["bias"]))
  qkv_BxCxT = (h @ f64(p["qkv"]["kernel"])[0] + f64(p["qkv"]["bias"])).transpose(0, 2, 1)
  ch = C // heads
  if new_order:  # QKVAttention: split q/k/v first, then heads.
    q, k, v = (t.reshape(B * heads, ch, H * W) for t in np.split(qkv_BxCxT, 3, axis=1))
  else:  # QKVAttentionLegacy: split heads first, then q/k/v.
    q, k, v = np.split(qkv_BxCxT.reshape(B * heads, 3 * ch, H * W), 3, axis=1)
  logits = np.einsum("bct,bcs->bts", q, k) / np.sqrt(ch)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  a = np.einsum("bts,bcs->bct", weights, v).reshape(B, C, H * W).transpose(0, 2, 1)
  out = a @ f64(p["proj_out"]["kernel"])[0] + f64(p["proj_out"]["bias"])
  return (x + out).reshape(B, H, W, C)


@pytest.fixture(scope="module")
def x():
  return np.random.default_rng(0).normal(size=(B, H, W, C)).astype(np.float32)


def _random_params(module, x, seed):
  """Random non-zero parameters (also where the reference zero-initialises), no init compile."""
  template = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.5 * rng.normal(size=s.shape)).astype(np.float32), template)


@pytest.mark.parametrize("new_order", [False, True], ids=["legacy_order", "new_order"])
@pytest.mark.parametrize("heads,head_channels", [(4, -1), (1, 8)], ids=["num_heads", "num_head_channels"])
def test_attention_block_matches_reference(x, new_order, heads, head_channels):
  block = AttentionBlock(
      num_heads=heads, num_head_channels=head_channels, use_new_attention_order=new_order, norm_num_groups=GROUPS
  )
  params = _random_params(block, x, seed=1)
  expected_heads = heads if head_channels == -1 else C // head_channels
  ours = jax.jit(block.apply)({"params": params}, x)
  expected = attention_block_reference(x, params, expected_heads, new_order)
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
  # The two qkv channel orders are different functions, so the flag is really exercised.
  other_order = attention_block_reference(x, params, expected_heads, not new_order)
  assert np.abs(np.asarray(ours) - other_order).max() > 1e-2


def test_attention_block_rejects_indivisible_heads(x):
  with pytest.raises(ValueError, match="cannot be split into heads"):
    AttentionBlock(num_heads=3, norm_num_groups=GROUPS).init(jax.random.key(0), x)


def test_resampling_without_conv(x):
  """conv_resample=False: 2x2 average pooling down, nearest-neighbour up, no parameters."""
  xn = np.asarray(x, np.float64)
  pooled = xn.reshape(B, H // 2, 2, W // 2, 2, C).mean(axis=(2, 4))
  np.testing.assert_allclose(Downsample(use_conv=False).apply({}, x), pooled, rtol=1e-6, atol=1e-6)
  repeated = xn.repeat(2, axis=1).repeat(2, axis=2)
  np.testing.assert_array_equal(Upsample(use_conv=False).apply({}, x), repeated.astype(np.float32))
  assert Downsample(use_conv=False).init(jax.random.key(0), x) == {}


def test_resampling_convs_shapes_and_names(x):
  down, up = Downsample(out_channels=8), Upsample()
  down_params = jax.eval_shape(down.init, jax.random.key(0), x)
  up_params = jax.eval_shape(up.init, jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, down_params["params"]) == {"op": {"kernel": (3, 3, C, 8), "bias": (8,)}}
  assert jax.tree.map(jnp.shape, up_params["params"]) == {"conv": {"kernel": (3, 3, C, C), "bias": (C,)}}
  assert jax.eval_shape(down.apply, down_params, x).shape == (B, H // 2, W // 2, 8)
  assert jax.eval_shape(up.apply, up_params, x).shape == (B, 2 * H, 2 * W, C)
