"""LDM-BERT: the text transformer the paper trains jointly with its txt2img UNet.

CompVis' ``BERTEmbedder`` wraps the 2021 copy of x-transformers vendored in
``ldm/modules/x_transformer.py``: ``TransformerWrapper`` with an ``Encoder``
of ``n_layer`` pre-LayerNorm blocks, each an (attention, feed-forward) pair.
Its defaults are fixed by ``BERTEmbedder``: 8 heads of 64 dims whatever the
width (so q/k/v project ``n_embed -> 512``), no q/k/v bias, feed-forward
``n_embed -> 4 n_embed`` with exact GELU, learned absolute positions, final
LayerNorm, ``return_embeddings=True`` (the logits head is built but unused).

Parameter names mirror the reference state dict under
``cond_stage_model.transformer.``: ``token_emb``, ``pos_emb.emb``,
``attn_layers.layers.{2i}.{0: norm, 1: attention}``,
``attn_layers.layers.{2i+1}.{0: norm, 1: feed-forward}``, ``norm``. Load the
paper's ``txt2img-f8-large`` with ``naming.torch_to_flax(sd, template,
strip_prefix="cond_stage_model.transformer.", ignore=LDMBert.unused_checkpoint_keys)``.

The reference passes no attention mask: the checkpoint was trained attending
to [PAD] tokens, so leave ``attention_mask`` None to reproduce it. With a mask,
masked keys are ignored; outputs at masked positions are then not meaningful.
"""

from functools import partial
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.clip_text import check_attention_mask, check_token_ids
from ldm_jax.nn.attention import dot_product_attention
from ldm_jax.nn.norm import LayerNorm

_EMBED_INIT = nn.initializers.normal(stddev=0.02)  # x-transformers' init of both embeddings


class Attention(nn.Module):
  """x-transformers ``Attention``: bias-free q/k/v of ``heads * dim_head``, biased ``to_out``."""

  dim: int
  heads: int = 8
  dim_head: int = 64
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, key_mask_BxL: jax.Array | None) -> jax.Array:
    dense = partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    b, length, _ = x_BxLxD.shape

    def heads(name):
      proj = dense(self.heads * self.dim_head, use_bias=False, name=name)(x_BxLxD)
      return proj.reshape(b, length, self.heads, self.dim_head)

    mask = None if key_mask_BxL is None else key_mask_BxL[:, None, None, :]
    out = dot_product_attention(
        heads("to_q"), heads("to_k"), heads("to_v"), mask, implementation=self.attention_impl
    )
    return dense(self.dim, name="to_out")(out.reshape(b, length, self.heads * self.dim_head))


class FeedForward(nn.Module):
  """x-transformers ``FeedForward`` without GLU: ``net = [Sequential(Linear, GELU), Dropout(0), Linear]``."""

  dim: int
  mult: int = 4
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    h = jax.nn.gelu(dense(self.dim * self.mult, name="net_0_0")(x), approximate=False)  # net.0.0
    return dense(self.dim, name="net_2")(h)


class Encoder(nn.Module):
  """x-transformers ``Encoder``: ``depth`` (attention, feed-forward) pairs, pre-norm, residual."""

  dim: int
  depth: int
  heads: int = 8
  dim_head: int = 64
  ff_mult: int = 4
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, key_mask_BxL: jax.Array | None) -> jax.Array:
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = partial(LayerNorm, param_dtype=self.param_dtype)
    for i in range(self.depth):
      a, f = 2 * i, 2 * i + 1  # layer_types = ('a', 'f') * depth
      h = norm(name=f"layers_{a}_0")(x)
      x = x + Attention(
          self.dim, self.heads, self.dim_head, attention_impl=self.attention_impl,
          name=f"layers_{a}_1", **common,
      )(h, key_mask_BxL)
      h = norm(name=f"layers_{f}_0")(x)
      x = x + FeedForward(self.dim, self.ff_mult, name=f"layers_{f}_1", **common)(h)
    return x


class AbsolutePositionalEmbedding(nn.Module):
  """Learned positions, an ``nn.Embedding`` called ``emb`` in the reference."""

  dim: int
  max_seq_len: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, length: int) -> jax.Array:
    emb = nn.Embed(
        self.max_seq_len, self.dim, dtype=self.dtype, param_dtype=self.param_dtype,
        embedding_init=_EMBED_INIT, name="emb",
    )
    return emb(jnp.arange(length))[None]


class LDMBert(nn.Module):
  """``BERTEmbedder``'s transformer: token ids (B, L) -> context (B, L, n_embed).

  Field names are ``BERTEmbedder``'s (plus x-transformers' ``heads``,
  ``dim_head`` and ``ff_mult`` at the defaults it uses). Defaults are
  the paper's 1.45B txt2img model (``n_embed=1280, n_layer=32``).
  """

  n_embed: int = 1280
  n_layer: int = 32
  vocab_size: int = 30522
  max_seq_len: int = 77
  embedding_dropout: float = 0.0
  heads: int = 8
  dim_head: int = 64
  ff_mult: int = 4
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = "auto"

  # In the reference state dict but never used (``return_embeddings=True``).
  unused_checkpoint_keys: ClassVar[tuple[str, ...]] = (r"^to_logits\.",)

  @nn.compact
  def __call__(
      self,
      tokens_BxL: jax.Array,
      attention_mask_BxL: jax.Array | None = None,
      *,
      deterministic: bool = True,
  ) -> jax.Array:
    """Embeds tokens; ``deterministic=False`` applies ``embedding_dropout`` (rng "dropout")."""
    tokens_BxL = check_token_ids(tokens_BxL, self.max_seq_len, type(self).__name__)
    key_mask = check_attention_mask(attention_mask_BxL, tokens_BxL.shape)
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Embed(self.vocab_size, self.n_embed, embedding_init=_EMBED_INIT, name="token_emb", **common)(
        tokens_BxL
    )
    x = x + AbsolutePositionalEmbedding(self.n_embed, self.max_seq_len, name="pos_emb", **common)(
        tokens_BxL.shape[1]
    )
    x = nn.Dropout(self.embedding_dropout)(x, deterministic=deterministic)
    x = Encoder(
        self.n_embed, self.n_layer, self.heads, self.dim_head, self.ff_mult,
        attention_impl=self.attention_impl, name="attn_layers", **common,
    )(x, key_mask)
    return LayerNorm(param_dtype=self.param_dtype, name="norm")(x)
