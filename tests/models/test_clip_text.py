"""CLIP text transformer against transformers' CLIPTextModel, and the SD v1 key list.

Tolerance: max |ours - reference| <= 1e-4 * max |reference| in float32.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_cond_helpers import assert_close

from ldm_jax.interop import naming
from ldm_jax.interop.openclip import add_text_model_prefix
from ldm_jax.models.clip_text import CLIPTextModel, clip_text_from_preset

VOCAB, EOS, WIDTH, HEADS, INTERMEDIATE, LAYERS, MAX_POS, LENGTH = 99, 98, 32, 4, 48, 2, 20, 16
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SD_V1_KEYS = os.path.join(TESTS, "fixtures", "sd_v1_state_dict_keys.txt")


def random_caption_ids(seed, pad_id, batch=3):
  """Random tokens with one EOS (the largest id) per row, padded after it."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, EOS, size=(batch, LENGTH))
  for row, eos_at in enumerate(rng.integers(3, LENGTH, size=batch)):
    ids[row, eos_at] = EOS
    ids[row, eos_at + 1:] = pad_id
  return ids.astype(np.int32)


def randomize(torch_model, seed):
  """Random values in every parameter (LayerNorms too), so every weight matters."""
  torch = pytest.importorskip("torch")
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in torch_model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      is_norm_scale = p.ndim == 1 and name.endswith("weight")
      p.copy_(1.0 + 0.3 * noise if is_norm_scale else 0.2 * noise)
  return torch_model.eval()


def hf_variant(tmp_path_factory, *, act, with_projection, seed):
  """A random transformers model, saved to disk and read back as a NumPy state dict."""
  pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from safetensors.numpy import load_file

  config = transformers.CLIPTextConfig(
      vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
      num_attention_heads=HEADS, max_position_embeddings=MAX_POS, hidden_act=act, projection_dim=24,
      eos_token_id=2,  # legacy CLIP configs: pooled at argmax(ids), as OpenAI / OpenCLIP do
      attn_implementation="eager",
  )
  cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
  model = randomize(cls(config), seed)
  folder = tmp_path_factory.mktemp(f"clip_{act}")
  model.save_pretrained(folder)
  return model, load_file(os.path.join(folder, "model.safetensors"))


def our_outputs(model: CLIPTextModel, state_dict, ids, mask=None):
  template = jax.eval_shape(model.init, jax.random.key(0), ids)
  # transformers 5 saves CLIPTextModel without the `text_model.` level (WithProjection keeps it).
  variables = naming.torch_to_flax(add_text_model_prefix(state_dict), template)
  return jax.jit(lambda v, i, m: model.apply(v, i, m, method=model.encode))(variables, ids, mask)


@pytest.fixture(scope="module")
def quick_gelu_last(tmp_path_factory):
  hf, state_dict = hf_variant(tmp_path_factory, act="quick_gelu", with_projection=False, seed=0)
  ours = CLIPTextModel(
      vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
      num_attention_heads=HEADS, max_position_embeddings=MAX_POS, hidden_act="quick_gelu",
  )
  return hf, state_dict, ours


def test_quick_gelu_last_layer_and_pooled_match_transformers(quick_gelu_last):
  torch = pytest.importorskip("torch")
  hf, state_dict, ours = quick_gelu_last
  ids = random_caption_ids(1, pad_id=EOS)
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids, dtype=torch.long))
  out = our_outputs(ours, state_dict, ids)
  assert out.context.shape == (3, LENGTH, WIDTH)
  assert_close(out.context, ref.last_hidden_state)
  assert_close(out.last_hidden_state, ref.last_hidden_state)
  assert_close(out.pooled_output, ref.pooler_output)
  assert out.text_embeds is None


def test_padding_mask_matches_transformers(quick_gelu_last):
  torch = pytest.importorskip("torch")
  hf, state_dict, ours = quick_gelu_last
  ids = random_caption_ids(2, pad_id=0)
  mask = (np.cumsum(ids == EOS, axis=1) - (ids == EOS) == 0).astype(np.int32)  # up to and with EOS
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
  out = our_outputs(ours, state_dict, ids, mask)
  assert_close(out.last_hidden_state, ref.last_hidden_state)
  assert_close(out.pooled_output, ref.pooler_output)


def test_gelu_penultimate_with_projection_matches_transformers(tmp_path_factory):
  torch = pytest.importorskip("torch")
  hf, state_dict = hf_variant(tmp_path_factory, act="gelu", with_projection=True, seed=3)
  ours = CLIPTextModel(
      vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
      num_attention_heads=HEADS, max_position_embeddings=MAX_POS, hidden_act="gelu",
      output_layer="penultimate", projection_dim=24,
  )
  ids = random_caption_ids(4, pad_id=0)
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids, dtype=torch.long), output_hidden_states=True)
    assert len(ref.hidden_states) == LAYERS + 1  # embeddings, then each layer
    penultimate = hf.text_model.final_layer_norm(ref.hidden_states[-2])
  out = our_outputs(ours, state_dict, ids)
  assert_close(out.context, penultimate)
  assert_close(out.last_hidden_state, ref.last_hidden_state)
  assert_close(out.text_embeds, ref.text_embeds)
  # Penultimate differs from last: the test would notice the wrong layer.
  assert np.max(np.abs(np.asarray(out.context) - np.asarray(out.last_hidden_state))) > 0.1


def test_sd_v1_preset_matches_reference_keys_and_size():
  reference = {}
  with open(SD_V1_KEYS) as f:
    for line in f:
      parts = line.split(maxsplit=1)
      if len(parts) == 2 and parts[0].startswith("cond_stage_model.transformer."):
        reference[parts[0]] = tuple(int(d) for d in parts[1].strip(" []\n").split(","))
  assert len(reference) == 197
  del reference["cond_stage_model.transformer.text_model.embeddings.position_ids"]  # a buffer
  model = clip_text_from_preset("sd_v1")
  template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 77), jnp.int32))
  assert naming.torch_shapes(template, add_prefix="cond_stage_model.transformer.") == reference
  n_params = sum(int(np.prod(s)) for s in reference.values())
  assert round(n_params / 1e6, 2) == 123.06


def test_bad_inputs_are_named():
  model = clip_text_from_preset("tiny")
  with pytest.raises(ValueError, match="exceed the maximum length 77"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 78), jnp.int32))
  with pytest.raises(ValueError, match="integer token ids"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 5), jnp.float32))
  with pytest.raises(ValueError, match="attention mask shape"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 5), jnp.int32), jnp.ones((1, 4)))
  with pytest.raises(ValueError, match="unknown CLIP text preset 'sd_v3'"):
    clip_text_from_preset("sd_v3")
  with pytest.raises(ValueError, match="hidden_act must be one of"):
    clip_text_from_preset("tiny", hidden_act="relu")
