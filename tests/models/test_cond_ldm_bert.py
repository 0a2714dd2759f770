"""LDM-BERT against an independent float64 NumPy run of the vendored x-transformers computation.

The NumPy reference reads weights by the reference state-dict names (our
params through ``naming.flax_to_torch``), so it checks naming and arithmetic
at once. Tolerance: max |ours - reference| <= 1e-4 * max |reference|.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf
from test_cond_helpers import assert_close, random_variables

from ldm_jax.interop import naming
from ldm_jax.models.ldm_bert import LDMBert

WIDTH, LAYERS, HEADS, DIM_HEAD, VOCAB, MAX_LEN, LENGTH = 48, 2, 2, 16, 50, 12, 10


def layer_norm(x, w, b, eps=1e-5):
  mean = x.mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps) * w + b


def x_transformers_reference(sd, tokens, mask=None):
  """TransformerWrapper(Encoder(dim, depth), return_embeddings=True) in float64."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  b, n = tokens.shape
  x = sd["token_emb.weight"][tokens] + sd["pos_emb.emb.weight"][:n][None]
  for i in range(LAYERS):
    a, f = f"attn_layers.layers.{2 * i}.", f"attn_layers.layers.{2 * i + 1}."
    h = layer_norm(x, sd[a + "0.weight"], sd[a + "0.bias"])
    q, k, v = (
        (h @ sd[a + f"1.to_{name}.weight"].T).reshape(b, n, HEADS, DIM_HEAD).transpose(0, 2, 1, 3)
        for name in "qkv"
    )
    dots = q @ k.transpose(0, 1, 3, 2) * DIM_HEAD**-0.5
    if mask is not None:  # the reference masks query rows and key columns
      pair = mask[:, None, :, None] & mask[:, None, None, :]
      dots = np.where(pair, dots, -np.finfo(np.float64).max)
    attn = np.exp(dots - dots.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    out = (attn @ v).transpose(0, 2, 1, 3).reshape(b, n, HEADS * DIM_HEAD)
    x = x + out @ sd[a + "1.to_out.weight"].T + sd[a + "1.to_out.bias"]
    h = layer_norm(x, sd[f + "0.weight"], sd[f + "0.bias"])
    h = h @ sd[f + "1.net.0.0.weight"].T + sd[f + "1.net.0.0.bias"]
    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))  # exact GELU (torch.nn.GELU)
    x = x + h @ sd[f + "1.net.2.weight"].T + sd[f + "1.net.2.bias"]
  return layer_norm(x, sd["norm.weight"], sd["norm.bias"])


@pytest.fixture(scope="module")
def bert():
  model = LDMBert(n_embed=WIDTH, n_layer=LAYERS, vocab_size=VOCAB, max_seq_len=MAX_LEN, heads=HEADS, dim_head=DIM_HEAD)
  tokens = np.random.default_rng(0).integers(0, VOCAB, size=(2, LENGTH)).astype(np.int32)
  variables = random_variables(model, tokens)  # norm scales and biases random too
  apply = jax.jit(lambda v, t, m: model.apply(v, t, m))
  return model, variables, apply, tokens


def test_matches_x_transformers_reference(bert):
  _, variables, apply, tokens = bert
  sd = naming.flax_to_torch(variables)
  assert_close(apply(variables, tokens, None), x_transformers_reference(sd, tokens))


def test_masked_positions_match_reference_and_ignore_padding(bert):
  _, variables, apply, tokens = bert
  sd = naming.flax_to_torch(variables)
  lengths = np.array([6, LENGTH])
  mask = np.arange(LENGTH)[None] < lengths[:, None]
  ours = np.asarray(apply(variables, tokens, mask))
  reference = x_transformers_reference(sd, tokens, mask)
  for row, n in enumerate(lengths):
    assert_close(ours[row, :n], reference[row, :n])
  # Other tokens behind the mask leave the unpadded outputs unchanged.
  other = np.where(mask, tokens, (tokens + 7) % VOCAB).astype(np.int32)
  np.testing.assert_allclose(np.asarray(apply(variables, other, mask))[0, :6], ours[0, :6], rtol=0, atol=1e-6)
  # ... while without the mask they would change them (the test can see padding).
  assert np.max(np.abs(np.asarray(apply(variables, other, None))[0, :6] - ours[0, :6])) > 1e-3


def test_txt2img_f8_large_parameter_names_and_shapes():
  """BERTEmbedder(n_embed=1280, n_layer=32) state dict, as the vendored x_transformer.py builds it."""
  d, inner, ff = 1280, 8 * 64, 4 * 1280
  expected = {"token_emb.weight": (30522, d), "pos_emb.emb.weight": (77, d), "norm.weight": (d,), "norm.bias": (d,)}
  for i in range(32):
    a, f = f"attn_layers.layers.{2 * i}.", f"attn_layers.layers.{2 * i + 1}."
    expected.update({a + "0.weight": (d,), a + "0.bias": (d,), f + "0.weight": (d,), f + "0.bias": (d,)})
    expected.update({a + f"1.to_{n}.weight": (inner, d) for n in "qkv"})
    expected.update({a + "1.to_out.weight": (d, inner), a + "1.to_out.bias": (d,)})
    expected.update({f + "1.net.0.0.weight": (ff, d), f + "1.net.0.0.bias": (ff,)})
    expected.update({f + "1.net.2.weight": (d, ff), f + "1.net.2.bias": (d,)})
  template = jax.eval_shape(LDMBert().init, jax.random.key(0), jnp.zeros((1, 77), jnp.int32))
  assert naming.torch_shapes(template) == expected


def test_checkpoint_with_unused_logits_head_loads(bert):
  _, variables, _, _ = bert
  sd = naming.flax_to_torch(variables, add_prefix="cond_stage_model.transformer.")
  sd["cond_stage_model.transformer.to_logits.weight"] = np.ones((VOCAB, WIDTH), np.float32)
  sd["cond_stage_model.transformer.to_logits.bias"] = np.ones((VOCAB,), np.float32)
  with pytest.raises(naming.StateDictMismatchError, match="to_logits"):
    naming.torch_to_flax(sd, variables, strip_prefix="cond_stage_model.transformer.")
  loaded = naming.torch_to_flax(
      sd, variables, strip_prefix="cond_stage_model.transformer.", ignore=LDMBert.unused_checkpoint_keys
  )
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, variables))


def test_embedding_dropout_applies_only_when_not_deterministic(bert):
  _, variables, apply, tokens = bert
  model = LDMBert(
      n_embed=WIDTH, n_layer=LAYERS, vocab_size=VOCAB, max_seq_len=MAX_LEN, heads=HEADS, dim_head=DIM_HEAD,
      embedding_dropout=0.5,
  )
  run = jax.jit(lambda v, t, rng: model.apply(v, t, deterministic=False, rngs={"dropout": rng}))
  dropped = np.asarray(run(variables, tokens, jax.random.key(2)))
  assert np.max(np.abs(dropped - np.asarray(apply(variables, tokens, None)))) > 1e-2


def test_bad_tokens_are_named():
  model = LDMBert(n_embed=WIDTH, n_layer=1, vocab_size=VOCAB, max_seq_len=MAX_LEN, heads=HEADS, dim_head=DIM_HEAD)
  with pytest.raises(ValueError, match="LDMBert: 13 tokens exceed the maximum length 12"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 13), jnp.int32))
