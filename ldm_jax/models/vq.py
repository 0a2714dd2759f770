"""Vector quantisation (taming's VectorQuantizer2) and the VQ-regularised autoencoder.

As LDM's ``VQModelInterface``, ``VQModel.encode`` returns the
*pre-quantisation* latent (what the diffusion model learns) and ``decode``
quantises inside. The codebook is ``quantize/embedding/embedding`` so the
reference key ``quantize.embedding.weight`` loads by the generic rename.
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.autoencoder import FirstStageMixin

Dtype = Any


class QuantizerInfo(NamedTuple):
  """What the quantiser chose, for logging and for the stage-2 tokens."""

  indices_BxHxW: jax.Array  # int32 code index per latent pixel
  perplexity: jax.Array  # exp(entropy) of the batch's code histogram
  usage: jax.Array  # fraction of the codebook used in this batch


def code_statistics(indices: jax.Array, n_embed: int) -> tuple[jax.Array, jax.Array]:
  """(perplexity, usage fraction) of a batch of code indices.

  A histogram instead of the reference's one-hot mean: same numbers without a
  (pixels x n_embed) matrix.
  """
  counts = jnp.bincount(indices.reshape(-1), length=n_embed)
  probs = counts.astype(jnp.float32) / indices.size
  perplexity = jnp.exp(-jnp.sum(probs * jnp.log(probs + 1e-10)))
  return perplexity, jnp.mean((counts > 0).astype(jnp.float32))


class VectorQuantizer(nn.Module):
  """Nearest-codebook-entry quantiser with a straight-through gradient.

  Loss: ``mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2)`` with
  ``legacy=True`` (the reference default, which puts beta on the codebook
  term); ``legacy=False`` puts beta on the commitment term as in the VQ-VAE
  paper. The codebook starts U(-1/n_embed, 1/n_embed) as in the reference.
  """

  n_embed: int
  embed_dim: int
  beta: float = 0.25
  legacy: bool = True
  param_dtype: Dtype = jnp.float32

  def setup(self):
    bound = 1.0 / self.n_embed
    self.embedding = nn.Embed(
        self.n_embed,
        self.embed_dim,
        param_dtype=self.param_dtype,
        embedding_init=lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound),
    )

  def __call__(self, z_BxHxWxD: jax.Array) -> tuple[jax.Array, jax.Array, QuantizerInfo]:
    """Returns (z_q with straight-through gradient, codebook loss, info)."""
    if z_BxHxWxD.shape[-1] != self.embed_dim:
      raise ValueError(f"VectorQuantizer expects {self.embed_dim} channels last, got shape {z_BxHxWxD.shape}")
    z = z_BxHxWxD.astype(jnp.float32)
    codebook_KxD = self.embedding.embedding.astype(jnp.float32)
    # |z - e|^2 = |z|^2 + |e|^2 - 2 z.e, in float32 whatever the model dtype.
    dist = (
        jnp.sum(jnp.square(z), axis=-1, keepdims=True)
        + jnp.sum(jnp.square(codebook_KxD), axis=-1)
        - 2.0 * jnp.einsum("bhwd,kd->bhwk", z, codebook_KxD)
    )
    indices = jnp.argmin(dist, axis=-1).astype(jnp.int32)
    z_q = jnp.take(codebook_KxD, indices, axis=0)
    commitment = jnp.mean(jnp.square(jax.lax.stop_gradient(z_q) - z))
    codebook = jnp.mean(jnp.square(z_q - jax.lax.stop_gradient(z)))
    loss = commitment + self.beta * codebook if self.legacy else self.beta * commitment + codebook
    z_q = z + jax.lax.stop_gradient(z_q - z)  # straight-through estimator
    perplexity, usage = code_statistics(indices, self.n_embed)
    return z_q.astype(z_BxHxWxD.dtype), loss, QuantizerInfo(indices, perplexity, usage)

  def embed_code(self, indices_BxHxW: jax.Array) -> jax.Array:
    """Codebook vectors of integer indices → [B, H, W, embed_dim]."""
    return self.embedding(indices_BxHxW)


class VQModel(FirstStageMixin, nn.Module):
  """Encoder → quant_conv → VectorQuantizer → post_quant_conv → Decoder."""

  ddconfig: Mapping[str, Any]
  n_embed: int
  embed_dim: int
  beta: float = 0.25
  legacy: bool = True
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    if self.ddconfig.get("double_z", True):
      raise ValueError("VQModel needs ddconfig double_z=False (the reference VQ configs set it)")
    self._setup_first_stage(self.embed_dim)
    self.quantize = VectorQuantizer(
        n_embed=self.n_embed,
        embed_dim=self.embed_dim,
        beta=self.beta,
        legacy=self.legacy,
        param_dtype=self.param_dtype,
    )

  def encode(self, x_BxHxWxC: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """The pre-quantisation latent h (what the LDM diffuses)."""
    return self.quant_conv(self.encoder(x_BxHxWxC, deterministic=deterministic))

  def decode(
      self, h_BxhxwxE: jax.Array, *, force_not_quantize: bool = False, deterministic: bool = True
  ) -> jax.Array:
    """Quantises h (unless ``force_not_quantize``) and decodes it."""
    z_q = h_BxhxwxE if force_not_quantize else self.quantize(h_BxhxwxE)[0]
    return self._decode_quantized(z_q, deterministic)

  def decode_code(self, indices_BxHxW: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """Decodes codebook indices (e.g. from a stage-2 token model)."""
    return self._decode_quantized(self.quantize.embed_code(indices_BxHxW), deterministic)

  def _decode_quantized(self, z_q: jax.Array, deterministic: bool) -> jax.Array:
    return self.decoder(self.post_quant_conv(z_q), deterministic=deterministic)

  def __call__(
      self, x_BxHxWxC: jax.Array, *, deterministic: bool = True
  ) -> tuple[jax.Array, jax.Array, QuantizerInfo]:
    """Returns (reconstruction, codebook loss, quantiser info)."""
    z_q, codebook_loss, info = self.quantize(self.encode(x_BxHxWxC, deterministic=deterministic))
    return self._decode_quantized(z_q, deterministic), codebook_loss, info
