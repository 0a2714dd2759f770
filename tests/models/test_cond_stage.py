"""make_cond_stage: every kind, unconditional inputs, and loading weights from files the test writes."""

import os

import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util
from safetensors import numpy as safetensors_numpy
from test_cond_helpers import random_variables

from ldm_jax.interop import naming
from ldm_jax.interop.cond_stage import cond_stage_variables
from ldm_jax.models.clip_text import CLIPTextModel
from ldm_jax.models.cond_stage import make_cond_stage
from ldm_jax.models.conditioners import ClassEmbedder, LayoutEncoder, SpatialRescaler
from ldm_jax.models.ldm_bert import LDMBert

TINY_CLIP = dict(kind="clip", preset="tiny", vocab_size=99, max_position_embeddings=16)


def cfg(**fields):
  return ml_collections.ConfigDict(fields)


def save_file(state_dict, path):
  # safetensors 0.8 writes a non-contiguous array's buffer as is (a transposed view comes out
  # un-transposed), and flax_to_torch returns transposed views.
  safetensors_numpy.save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, path)


def assert_same_variables(got, expected):
  got, expected = traverse_util.flatten_dict(got), traverse_util.flatten_dict(expected)
  assert got.keys() == expected.keys()
  for path in expected:
    np.testing.assert_array_equal(got[path], expected[path], err_msg="/".join(path))


def test_unknown_kind_lists_the_valid_ones():
  valid = "none, class, text, clip, layout, concat"
  with pytest.raises(ValueError, match=f"unknown cond_stage kind 'bert'; valid kinds: {valid}"):
    make_cond_stage(cfg(kind="bert"))
  with pytest.raises(ValueError, match=r"has no fields \['n_embd'\]; valid: "):
    make_cond_stage(cfg(kind="text", n_embd=512))
  with pytest.raises(ValueError, match=r"kind 'clip' \(CLIPTextModel\) has no fields \['width'\]"):
    make_cond_stage(cfg(kind="clip", preset="sd_v1", width=512))
  with pytest.raises(ValueError, match="unknown CLIP text preset 'sd_v3'"):
    make_cond_stage(cfg(kind="clip", preset="sd_v3"))
  with pytest.raises(ValueError, match="'preset' only applies to kind 'clip'"):
    make_cond_stage(cfg(kind="class", embed_dim=8, preset="sd_v1"))


def test_descriptions_and_unconditional_inputs():
  none = make_cond_stage(cfg(kind="none"))
  assert none.module is None and none.mode is None and none.encode(None, None) is None

  cls = make_cond_stage(cfg(kind="class", embed_dim=512, n_classes=1001, key="class_label"))
  assert isinstance(cls.module, ClassEmbedder) and cls.trainable and (cls.mode, cls.output_dim) == ("crossattn", 512)
  np.testing.assert_array_equal(cls.unconditional(np.array([3, 7, 999])), [1000, 1000, 1000])

  text = make_cond_stage(cfg(kind="text", n_embed=1280, n_layer=32, use_tokenizer=True))
  assert isinstance(text.module, LDMBert) and text.trainable and text.output_dim == 1280
  empty = text.unconditional(np.ones((2, 77), np.int32))
  np.testing.assert_array_equal(empty, np.tile([101, 102] + [0] * 75, (2, 1)))  # BERT "" -> [CLS] [SEP] [PAD]...

  clip_v1 = make_cond_stage(cfg(kind="clip", preset="sd_v1"))
  assert isinstance(clip_v1.module, CLIPTextModel) and not clip_v1.trainable and clip_v1.output_dim == 768
  np.testing.assert_array_equal(clip_v1.unconditional(np.ones((1, 77))), [[49406] + [49407] * 76])
  clip_v2 = make_cond_stage(cfg(kind="clip", preset="sd_v2", dtype="bfloat16"))
  assert clip_v2.output_dim == 1024 and clip_v2.module.output_layer == "penultimate"
  assert clip_v2.module.dtype == np.dtype("bfloat16")
  np.testing.assert_array_equal(clip_v2.unconditional(np.ones((1, 77))), [[49406, 49407] + [0] * 75])

  layout = make_cond_stage(cfg(kind="layout"))
  assert isinstance(layout.module, LayoutEncoder) and layout.output_dim == 512
  np.testing.assert_array_equal(layout.unconditional(np.ones((2, 92))), layout.module.empty_layout_tokens(2))

  sem = make_cond_stage(cfg(kind="concat", n_stages=2, method="nearest", in_channels=182, out_channels=3))
  assert isinstance(sem.module, SpatialRescaler) and sem.trainable and (sem.mode, sem.output_dim) == ("concat", 3)
  identity = make_cond_stage(cfg(kind="concat", n_stages=0, in_channels=3, trainable=False))
  x = np.random.default_rng(0).standard_normal((1, 4, 4, 3)).astype(np.float32)
  assert not identity.trainable and identity.output_dim == 3
  np.testing.assert_array_equal(identity.encode(identity.init(jax.random.key(0), x), x), x)
  np.testing.assert_array_equal(identity.unconditional(x), np.zeros_like(x))


@pytest.mark.parametrize("fields", [
    dict(kind="none"), dict(kind="class", embed_dim=8, n_classes=11), dict(kind="text", n_embed=32, n_layer=1),
    dict(kind="clip", preset="sd_v2"), dict(kind="layout"), dict(kind="concat", n_stages=1, in_channels=3),
], ids=lambda f: f["kind"])
def test_equal_configs_build_equal_hashable_stages(fields):
  # The sampling program is jitted with the model static, so pipelines of equal
  # configs share it only if their stages (null-input makers included) compare equal.
  a, b = make_cond_stage(cfg(**fields)), make_cond_stage(cfg(**fields))
  assert a == b and hash(a) == hash(b)
  if fields["kind"] == "class":
    assert a != make_cond_stage(cfg(**{**fields, "n_classes": 12}))  # another null class


def test_random_init_without_checkpoint():
  stage = make_cond_stage(cfg(kind="class", embed_dim=8, n_classes=11))
  labels = np.array([1, 10], np.int32)
  variables = stage.init(jax.random.key(0), labels)
  assert variables["params"]["embedding"]["embedding"].shape == (11, 8)
  assert stage.encode(variables, labels).shape == (2, 1, 8)


@pytest.fixture(scope="module")
def tiny_clip():
  stage = make_cond_stage(cfg(**TINY_CLIP))
  ids = np.array([[49406 % 99, 5, 98, 98]], np.int32)
  return stage, ids, random_variables(stage.module, ids, seed=1)


def test_loads_sd_v1_single_file_layout(tmp_path, tiny_clip):
  _, ids, variables = tiny_clip
  sd = naming.flax_to_torch(variables, add_prefix="cond_stage_model.transformer.")
  sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = np.arange(16)[None]
  sd["model.diffusion_model.out.2.weight"] = np.ones((4, 320, 3, 3), np.float32)  # not ours: skipped
  path = os.path.join(tmp_path, "sd-v1.safetensors")
  save_file(sd, path)
  stage = make_cond_stage(cfg(**TINY_CLIP, checkpoint=path))
  assert_same_variables(cond_stage_variables(stage, jax.random.key(0), ids), variables)


def test_loads_transformers5_text_encoder_folder(tmp_path, tiny_clip):
  _, ids, variables = tiny_clip
  flat = {k.removeprefix("text_model."): v for k, v in naming.flax_to_torch(variables).items()}
  assert "encoder.layers.0.mlp.fc1.weight" in flat
  save_file(flat, os.path.join(tmp_path, "model.safetensors"))
  stage = make_cond_stage(cfg(**TINY_CLIP, checkpoint=str(tmp_path)))
  assert_same_variables(cond_stage_variables(stage, jax.random.key(0), ids), variables)


def to_openclip(variables, prefix):
  """Our params -> OpenCLIP text-tower names, written independently of the converter."""
  sd = naming.flax_to_torch(variables)
  out = {
      "token_embedding.weight": sd.pop("text_model.embeddings.token_embedding.weight"),
      "positional_embedding": sd.pop("text_model.embeddings.position_embedding.weight"),
      "text_projection": sd.pop("text_projection.weight").T,
      "logit_scale": np.array(4.6, np.float32),
  }
  renames = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj", "text_model.final_layer_norm": "ln_final",
             "text_model.encoder.layers": "transformer.resblocks"}
  for leaf in ("weight", "bias"):
    for i in range(2):
      qkv = [sd.pop(f"text_model.encoder.layers.{i}.self_attn.{n}_proj.{leaf}") for n in "qkv"]
      out[f"transformer.resblocks.{i}.attn.in_proj_{leaf}"] = np.concatenate(qkv)
  for key, value in sd.items():
    for old, new in renames.items():
      key = key.replace(old, new)
    out[key] = value
  return {prefix + k: v for k, v in out.items()}


def test_loads_sd_v2_openclip_layout(tmp_path):
  fields = dict(TINY_CLIP, hidden_act="gelu", output_layer="penultimate", projection_dim=8)
  stage = make_cond_stage(cfg(**fields))
  ids = np.array([[3, 5, 98, 0]], np.int32)
  variables = random_variables(stage.module, ids, seed=2)
  path = os.path.join(tmp_path, "sd-v2.safetensors")
  save_file(to_openclip(variables, "cond_stage_model.model."), path)
  loaded = cond_stage_variables(make_cond_stage(cfg(**fields, checkpoint=path)), jax.random.key(0), ids)
  assert_same_variables(loaded, variables)


def test_loads_ldm_bert_with_unused_logits_head(tmp_path):
  fields = dict(kind="text", n_embed=16, n_layer=1, vocab_size=40, max_seq_len=8, heads=2, dim_head=4)
  stage = make_cond_stage(cfg(**fields))
  tokens = np.array([[101 % 40, 3, 0, 0]], np.int32)
  variables = random_variables(stage.module, tokens, seed=3)
  sd = naming.flax_to_torch(variables, add_prefix="cond_stage_model.transformer.")
  sd["cond_stage_model.transformer.to_logits.weight"] = np.ones((40, 16), np.float32)
  sd["cond_stage_model.transformer.to_logits.bias"] = np.ones((40,), np.float32)
  path = os.path.join(tmp_path, "txt2img.safetensors")
  save_file(sd, path)
  loaded = cond_stage_variables(make_cond_stage(cfg(**fields, checkpoint=path)), jax.random.key(0), tokens)
  assert_same_variables(loaded, variables)
  # The same as a PyTorch Lightning .ckpt (weights under "state_dict").
  torch = pytest.importorskip("torch")
  ckpt = os.path.join(tmp_path, "txt2img.ckpt")
  torch.save({"state_dict": {k: torch.tensor(np.ascontiguousarray(v)) for k, v in sd.items()}}, ckpt)
  loaded = cond_stage_variables(make_cond_stage(cfg(**fields, checkpoint=ckpt)), jax.random.key(0), tokens)
  assert_same_variables(loaded, variables)


def test_missing_checkpoint_is_named(tmp_path):
  stage = make_cond_stage(cfg(**TINY_CLIP, checkpoint=os.path.join(tmp_path, "nope.safetensors")))
  with pytest.raises(FileNotFoundError, match="nope.safetensors"):
    cond_stage_variables(stage, jax.random.key(0), np.zeros((1, 4), np.int32))


def test_cond_stage_variables_without_checkpoint_and_init_with_one(tmp_path):
  assert cond_stage_variables(make_cond_stage(cfg(kind="none")), jax.random.key(0), None) is None
  stage = make_cond_stage(cfg(kind="class", embed_dim=8, n_classes=11))
  labels = np.array([1, 10], np.int32)
  assert_same_variables(cond_stage_variables(stage, jax.random.key(0), labels), stage.init(jax.random.key(0), labels))
  # The module never reads files: a stage with a checkpoint points to the reader.
  with_file = make_cond_stage(cfg(kind="class", embed_dim=8, n_classes=11, checkpoint=str(tmp_path / "c.safetensors")))
  with pytest.raises(ValueError, match="ldm_jax.interop.cond_stage.cond_stage_variables"):
    with_file.init(jax.random.key(0), labels)
