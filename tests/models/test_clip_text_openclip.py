"""SD 2.x's OpenCLIP text tower: key conversion, penultimate layer, 24- vs 23-layer storage.

The reference is OpenCLIP's own computation, written here with PyTorch's
``nn.MultiheadAttention`` on the fused ``in_proj`` weights (as OpenCLIP runs
it), so a wrong q/k/v split or transpose in the converter shows up.
Tolerance: max |ours - reference| <= 1e-4 * max |reference| in float32.
"""

import jax
import numpy as np
import pytest
from test_cond_helpers import assert_close

from ldm_jax.interop import naming
from ldm_jax.interop.openclip import openclip_text_to_transformers, transformers_text_to_openclip
from ldm_jax.models.clip_text import CLIPTextModel

VOCAB, WIDTH, HEADS, LAYERS, CONTEXT, EMBED, LENGTH = 99, 32, 4, 3, 16, 24, 16
PREFIX = "cond_stage_model.model."


def random_openclip_state_dict(seed: int) -> dict[str, np.ndarray]:
  """An SD 2.x-style checkpoint fragment: OpenCLIP text tower plus keys that are not it."""
  rng = np.random.default_rng(seed)

  def w(*shape):
    return (0.2 * rng.standard_normal(shape)).astype(np.float32)

  def norm(name):
    return {f"{name}.weight": 1 + w(WIDTH), f"{name}.bias": w(WIDTH)}

  sd = {"token_embedding.weight": w(VOCAB, WIDTH), "positional_embedding": w(CONTEXT, WIDTH)}
  for i in range(LAYERS):
    block = f"transformer.resblocks.{i}."
    sd.update({block + k: v for k, v in norm("ln_1").items()})
    sd.update({block + k: v for k, v in norm("ln_2").items()})
    sd[block + "attn.in_proj_weight"], sd[block + "attn.in_proj_bias"] = w(3 * WIDTH, WIDTH), w(3 * WIDTH)
    sd[block + "attn.out_proj.weight"], sd[block + "attn.out_proj.bias"] = w(WIDTH, WIDTH), w(WIDTH)
    sd[block + "mlp.c_fc.weight"], sd[block + "mlp.c_fc.bias"] = w(4 * WIDTH, WIDTH), w(4 * WIDTH)
    sd[block + "mlp.c_proj.weight"], sd[block + "mlp.c_proj.bias"] = w(WIDTH, 4 * WIDTH), w(WIDTH)
  sd.update(norm("ln_final"))
  sd["text_projection"] = w(WIDTH, EMBED)
  sd["logit_scale"] = np.float32(4.6)
  out = {PREFIX + k: v for k, v in sd.items()}
  out["model.diffusion_model.out.2.bias"] = w(4)  # not the text tower: ignored
  return out


def openclip_reference(sd, ids, stop_before_last: bool):
  """OpenCLIP ``encode_text`` / SD 2's ``FrozenOpenCLIPEmbedder`` in PyTorch float32."""
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  t = {k[len(PREFIX):]: torch.tensor(np.asarray(v)) for k, v in sd.items() if k.startswith(PREFIX)}
  x = t["token_embedding.weight"][torch.tensor(ids, dtype=torch.long)] + t["positional_embedding"][:LENGTH]
  causal = torch.full((LENGTH, LENGTH), float("-inf")).triu_(1)
  x = x.permute(1, 0, 2)  # OpenCLIP runs its transformer sequence-first
  for i in range(LAYERS - 1 if stop_before_last else LAYERS):
    p = lambda name: t[f"transformer.resblocks.{i}.{name}"]  # noqa: E731
    attn = torch.nn.MultiheadAttention(WIDTH, HEADS)
    attn.load_state_dict({
        "in_proj_weight": p("attn.in_proj_weight"), "in_proj_bias": p("attn.in_proj_bias"),
        "out_proj.weight": p("attn.out_proj.weight"), "out_proj.bias": p("attn.out_proj.bias"),
    })
    h = F.layer_norm(x, (WIDTH,), p("ln_1.weight"), p("ln_1.bias"), 1e-5)
    x = x + attn(h, h, h, need_weights=False, attn_mask=causal)[0]
    h = F.layer_norm(x, (WIDTH,), p("ln_2.weight"), p("ln_2.bias"), 1e-5)
    x = x + F.linear(F.gelu(F.linear(h, p("mlp.c_fc.weight"), p("mlp.c_fc.bias"))),
                     p("mlp.c_proj.weight"), p("mlp.c_proj.bias"))
  x = F.layer_norm(x.permute(1, 0, 2), (WIDTH,), t["ln_final.weight"], t["ln_final.bias"], 1e-5)
  pooled = x[torch.arange(x.shape[0]), torch.tensor(ids).argmax(-1)] @ t["text_projection"]
  return x.detach().numpy(), pooled.detach().numpy()


def make_model(**overrides) -> CLIPTextModel:
  fields = dict(
      vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS,
      num_attention_heads=HEADS, max_position_embeddings=CONTEXT, hidden_act="gelu",
  )
  return CLIPTextModel(**{**fields, **overrides})


@pytest.fixture(scope="module")
def case():
  pytest.importorskip("torch")
  sd = random_openclip_state_dict(0)
  rng = np.random.default_rng(1)
  ids = rng.integers(1, VOCAB - 1, size=(2, LENGTH)).astype(np.int32)
  ids[0, 7], ids[0, 8:] = VOCAB - 1, 0  # EOS then OpenCLIP's zero padding
  ids[1, 12], ids[1, 13:] = VOCAB - 1, 0
  return sd, ids


def test_converted_openclip_matches_openclip_penultimate_and_projection(case):
  sd, ids = case
  model = make_model(output_layer="penultimate", projection_dim=EMBED)
  template = jax.eval_shape(model.init, jax.random.key(0), ids)
  variables = naming.torch_to_flax(openclip_text_to_transformers(sd), template)
  out = jax.jit(lambda v, i: model.apply(v, i, method=model.encode))(variables, ids)
  penultimate, _ = openclip_reference(sd, ids, stop_before_last=True)
  last, text_embeds = openclip_reference(sd, ids, stop_before_last=False)
  assert_close(out.context, penultimate)
  assert_close(out.last_hidden_state, last)
  assert_close(out.text_embeds, text_embeds)


def test_diffusers_layout_with_one_layer_less_gives_the_same_context(case):
  """diffusers' SD 2 text_encoder: the first N-1 layers, output 'last' = original's penultimate."""
  sd, ids = case
  converted = openclip_text_to_transformers(sd, include_projection=False)
  last_layer = f"text_model.encoder.layers.{LAYERS - 1}."
  truncated = {k: v for k, v in converted.items() if not k.startswith(last_layer)}
  assert len(truncated) < len(converted)
  model = make_model(num_hidden_layers=LAYERS - 1, output_layer="last")
  template = jax.eval_shape(model.init, jax.random.key(0), ids)
  variables = naming.torch_to_flax(truncated, template)
  penultimate, _ = openclip_reference(sd, ids, stop_before_last=True)
  assert_close(jax.jit(model.apply)(variables, ids), penultimate)


def test_qkv_split_and_projection_transpose():
  sd = random_openclip_state_dict(2)
  converted = openclip_text_to_transformers(sd)
  fused = sd[PREFIX + "transformer.resblocks.1.attn.in_proj_weight"]
  for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
    np.testing.assert_array_equal(
        converted[f"text_model.encoder.layers.1.self_attn.{name}.weight"], fused[i * WIDTH:(i + 1) * WIDTH]
    )
  np.testing.assert_array_equal(converted["text_projection.weight"], sd[PREFIX + "text_projection"].T)
  assert not any("logit_scale" in k or "diffusion_model" in k for k in converted)


def test_unknown_openclip_keys_are_named():
  sd = random_openclip_state_dict(3)
  sd[PREFIX + "transformer.resblocks.0.ls_1.gamma"] = np.ones(WIDTH, np.float32)
  with pytest.raises(naming.StateDictMismatchError, match=r"resblocks\.0\.ls_1\.gamma"):
    openclip_text_to_transformers(sd)
  with pytest.raises(ValueError, match="no OpenCLIP text-tower keys"):
    openclip_text_to_transformers(sd, prefix="cond_stage_model.transformer.")


def test_transformers_names_go_back_to_openclip_exactly():
  """The export direction (SD 2.x single files) inverts the load direction, q/k/v fusion included."""
  original = {k: v for k, v in random_openclip_state_dict(3).items()
              if k.startswith(PREFIX) and "visual." not in k and not k.endswith(("logit_scale", "attn_mask"))}
  back = transformers_text_to_openclip(openclip_text_to_transformers(original, prefix=PREFIX), prefix=PREFIX)
  assert back.keys() == original.keys()
  for key, value in original.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  with pytest.raises(naming.StateDictMismatchError, match="k_proj"):
    transformers_text_to_openclip({"text_model.encoder.layers.0.self_attn.q_proj.weight": np.ones((2, 2)),
                                   "text_model.encoder.layers.0.self_attn.v_proj.weight": np.ones((2, 2))})
