"""Tiny KL and VQ autoencoders against diffusers' PyTorch implementation.

diffusers' state dicts are renamed to the original CompVis names with
``interop.diffusers_vae``, then loaded through the generic ``interop.naming`` rule,
so these tests also check that our parameter tree takes reference
checkpoints.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.interop.diffusers_vae import diffusers_vae_to_original
from ldm_jax.interop.naming import torch_to_flax
from ldm_jax.models.autoencoder import AutoencoderKL
from ldm_jax.models.vq import VQModel

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

CH, CH_MULT, GROUPS = 8, (1, 2, 2), 4
X_SHAPE = (2, 32, 48, 3)  # not square: catches H/W mix-ups


def randomize_(module, seed: int) -> None:
  """Moves every parameter off its init (norms included) so all paths matter."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))


def to_flax_variables(torch_model, flax_model, x_shape, **init_kw):
  section = {"ddconfig": flax_model.ddconfig}
  sd = diffusers_vae_to_original({k: v.numpy() for k, v in torch_model.state_dict().items()}, section)
  template = jax.eval_shape(
      lambda x: flax_model.init(jax.random.key(0), x, **init_kw), jax.ShapeDtypeStruct(x_shape, jnp.float32)
  )
  return torch_to_flax(sd, template, what="diffusers VAE")


def nchw(x):
  return torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2)


def nhwc(t):
  return t.detach().permute(0, 2, 3, 1).numpy()


def diffusers_kwargs(levels):
  return dict(
      in_channels=3, out_channels=3, block_out_channels=tuple(CH * m for m in levels),
      down_block_types=("DownEncoderBlock2D",) * len(levels), up_block_types=("UpDecoderBlock2D",) * len(levels),
      layers_per_block=1, latent_channels=3, norm_num_groups=GROUPS, sample_size=32,
  )


DDCONFIG = dict(
    ch=CH, ch_mult=CH_MULT, num_res_blocks=1, attn_resolutions=(), z_channels=3, resolution=32,
    in_channels=3, out_ch=3, norm_num_groups=GROUPS,
)


def test_kl_autoencoder_matches_diffusers():
  torch.manual_seed(0)
  ref = diffusers.models.AutoencoderKL(**diffusers_kwargs(CH_MULT)).eval()
  randomize_(ref, 1)
  ours = AutoencoderKL(ddconfig=dict(DDCONFIG, double_z=True), embed_dim=3)
  variables = to_flax_variables(ref, ours, X_SHAPE, sample_posterior=False)
  x = np.random.default_rng(0).uniform(-1, 1, X_SHAPE).astype(np.float32)
  z = np.random.default_rng(1).normal(size=(2, 8, 12, 3)).astype(np.float32)

  @jax.jit
  def run(variables, x, z):
    post = ours.apply(variables, x, method=AutoencoderKL.encode)
    return post.mean, post.logvar, ours.apply(variables, z, method=AutoencoderKL.decode)

  mean, logvar, dec = run(variables, x, z)
  with torch.no_grad():
    dist = ref.encode(nchw(x)).latent_dist
    ref_dec = ref.decode(nchw(z)).sample
  np.testing.assert_allclose(mean, nhwc(dist.mean), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(logvar, nhwc(dist.logvar), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dec, nhwc(ref_dec), rtol=1e-4, atol=1e-4)

  # bfloat16 compute with the same float32 params stays close to float32.
  bf16 = AutoencoderKL(ddconfig=dict(DDCONFIG, double_z=True), embed_dim=3, dtype=jnp.bfloat16)
  dec_bf16 = jax.jit(lambda v, z: bf16.apply(v, z, method=AutoencoderKL.decode))(variables, z)
  assert dec_bf16.dtype == jnp.bfloat16
  err = np.abs(np.asarray(dec_bf16, np.float32) - np.asarray(dec))
  assert err.max() < 0.05 * np.abs(np.asarray(dec)).max()


def test_vq_model_matches_diffusers():
  levels = CH_MULT[:2]
  torch.manual_seed(0)
  ref = diffusers.models.VQModel(**diffusers_kwargs(levels), num_vq_embeddings=16, vq_embed_dim=3).eval()
  randomize_(ref, 2)
  x = np.random.default_rng(0).uniform(-1, 1, X_SHAPE).astype(np.float32)
  with torch.no_grad():
    h_ref = ref.encode(nchw(x)).latents
    # Spread the codebook over the latents' range so many codes get used.
    ref.quantize.embedding.weight.copy_(h_ref.permute(0, 2, 3, 1).reshape(-1, 3)[::13][:16])
    dec_ref = ref.decode(h_ref).sample
    _, _, (_, _, idx_ref) = ref.quantize(h_ref)

  ours = VQModel(ddconfig=dict(DDCONFIG, ch_mult=levels, double_z=False), n_embed=16, embed_dim=3)
  variables = to_flax_variables(ref, ours, X_SHAPE)

  @jax.jit
  def run(variables, x):
    h = ours.apply(variables, x, method=VQModel.encode)
    _, _, info = ours.apply(variables, h, method=lambda m, h: m.quantize(h))
    return h, info.indices_BxHxW, ours.apply(variables, h, method=VQModel.decode)

  h, indices, dec = run(variables, x)
  np.testing.assert_allclose(h, nhwc(h_ref), rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(indices).reshape(-1), idx_ref.numpy().reshape(-1))
  assert len(np.unique(indices)) > 4
  np.testing.assert_allclose(dec, nhwc(dec_ref), rtol=1e-4, atol=1e-4)
