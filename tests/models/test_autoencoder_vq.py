"""The vector quantiser against brute force NumPy, and VQModel's decode paths."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models.vq import VectorQuantizer, VQModel, code_statistics

K, D = 12, 3


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  codebook = rng.normal(size=(K, D)).astype(np.float32)
  z = rng.normal(size=(2, 4, 5, D)).astype(np.float32)
  return codebook, z


@functools.partial(jax.jit, static_argnames="legacy")
def quantize(codebook, z, legacy=True):
  vq = VectorQuantizer(n_embed=codebook.shape[0], embed_dim=D, legacy=legacy)
  return vq.apply({"params": {"embedding": {"embedding": codebook}}}, z)


def test_picks_nearest_code_and_passes_gradient_straight_through(data):
  codebook, z = data
  z_q, _, info = quantize(codebook, z)
  dist = ((z.astype(np.float64)[..., None, :] - codebook.astype(np.float64)) ** 2).sum(-1)
  expected = dist.argmin(-1)
  np.testing.assert_array_equal(info.indices_BxHxW, expected)
  np.testing.assert_allclose(z_q, codebook[expected], rtol=1e-6, atol=1e-6)
  grad = jax.grad(lambda z: jnp.sum(quantize(codebook, z)[0]))(z)
  np.testing.assert_array_equal(grad, np.ones_like(z))


@pytest.mark.parametrize("legacy", [True, False])
def test_codebook_loss_value_and_gradients(data, legacy):
  codebook, z = data
  beta, n = 0.25, z.size
  loss, (dz, dcb) = jax.value_and_grad(lambda z, cb: quantize(cb, z, legacy)[1], argnums=(0, 1))(z, codebook)
  idx = ((z[..., None, :] - codebook) ** 2).sum(-1).argmin(-1)
  diff = (z - codebook[idx]).astype(np.float64)  # z - z_q
  np.testing.assert_allclose(loss, (1 + beta) * np.mean(diff**2), rtol=1e-5)
  # legacy=True: beta weighs the codebook term; legacy=False: the commitment term.
  w_commit, w_code = (1.0, beta) if legacy else (beta, 1.0)
  np.testing.assert_allclose(dz, w_commit * 2 * diff / n, rtol=1e-5, atol=1e-8)
  expected_dcb = np.zeros((K, D))
  np.add.at(expected_dcb, idx.reshape(-1), (-w_code * 2 * diff / n).reshape(-1, D))
  np.testing.assert_allclose(dcb, expected_dcb, rtol=1e-5, atol=1e-8)


def test_perplexity_and_usage_on_constructed_assignment():
  codebook = 10.0 * np.eye(4, D + 1, dtype=np.float32)[:, :D]  # codes 0..2 on the axes, 3 at the origin
  counts = [4, 2, 2, 0]  # code 3 unused
  z = np.concatenate([np.repeat(codebook[i : i + 1], c, 0) for i, c in enumerate(counts)])
  z = (z + 0.01).reshape(1, 2, 4, D)
  _, _, info = quantize(codebook, z)
  p = np.array(counts) / 8
  entropy = -sum(pi * math.log(pi) for pi in p if pi > 0)
  np.testing.assert_allclose(info.perplexity, math.exp(entropy), rtol=1e-5)
  np.testing.assert_allclose(info.usage, 0.75)
  perplexity, usage = jax.jit(code_statistics, static_argnums=1)(jnp.zeros((3, 5), jnp.int32), 7)  # one code
  np.testing.assert_allclose([perplexity, usage], [1.0, 1 / 7], rtol=1e-6)


def test_codebook_init_is_uniform_in_one_over_n():
  vq = VectorQuantizer(n_embed=64, embed_dim=32)
  init = jax.jit(vq.init)(jax.random.key(0, impl="rbg"), jnp.ones((1, 2, 2, 32)))
  codebook = np.asarray(init["params"]["embedding"]["embedding"])
  assert codebook.shape == (64, 32) and np.abs(codebook).max() <= 1 / 64
  np.testing.assert_allclose(codebook.std(), (1 / 64) / math.sqrt(3), rtol=0.05)


def test_wrong_latent_width_is_named(data):
  codebook, z = data
  vq = VectorQuantizer(n_embed=K, embed_dim=D)
  with pytest.raises(ValueError, match="expects 3 channels"):
    vq.apply({"params": {"embedding": {"embedding": codebook}}}, np.concatenate([z, z], -1))


def test_vq_model_decode_paths_agree():
  """decode(h) quantises; decode_code(indices) decodes the same codes."""
  ddconfig = dict(ch=4, ch_mult=(1, 2), num_res_blocks=1, z_channels=3, resolution=16, norm_num_groups=2,
                  double_z=False, use_mid_attn=False)
  model = VQModel(ddconfig=ddconfig, n_embed=8, embed_dim=D)
  x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
  template = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  rng = np.random.default_rng(1)
  variables = jax.tree.map(lambda s: rng.normal(scale=0.3, size=s.shape).astype(np.float32), template)
  h = rng.normal(size=(2, 8, 8, D)).astype(np.float32)

  @jax.jit
  def run(variables, h):
    z_q, _, info = model.apply(variables, h, method=lambda m, h: m.quantize(h))
    return (
        model.apply(variables, h, method=VQModel.decode),
        model.apply(variables, z_q, force_not_quantize=True, method=VQModel.decode),
        model.apply(variables, info.indices_BxHxW, method=VQModel.decode_code),
        model.apply(variables, h, force_not_quantize=True, method=VQModel.decode),
    )

  quantized, pre_quantized, from_codes, unquantized = run(variables, h)
  np.testing.assert_allclose(quantized, pre_quantized, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(quantized, from_codes, rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(quantized) - np.asarray(unquantized)).max() > 1e-3
