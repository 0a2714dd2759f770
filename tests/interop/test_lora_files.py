"""LoRA files in diffusers' layout: exact round trips, the older layouts, one error for every problem, and
parity with diffusers + peft both ways.

Parity tolerance: UNet outputs and text-encoder hidden states within 1e-4
relative error (max |ours - ref| / max |ref|, float32), as the other
diffusers parity tests; adapters read from a peft file equal peft's tensors
exactly (up to the transpose).
"""

import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import save_file

from ldm_jax.interop.lora_files import apply_lora_file, load_lora, lora_from_state_dict, lora_state_dict, save_lora
from ldm_jax.interop.naming import StateDictMismatchError
from ldm_jax.interop.pretrained import load_pretrained_pipeline
from ldm_jax.models.clip_text import CLIPTextModel
from ldm_jax.models.unet import UNetModel, unet_preset
from ldm_jax.nn.lora import LoRAConfig, apply_adapters, init_adapters

UNET_FIELDS = unet_preset("sd_v1", model_channels=16, num_res_blocks=1, norm_num_groups=8, channel_mult=(1, 2),
                          attention_resolutions=(1,), num_heads=4, context_dim=24)
CONFIG = LoRAConfig(rank=3, alpha=5.0, targets=("attention", "proj", "ff", "conv", "text_attention", "text_mlp"))


def random_tree(tree, seed: int, std: float = 0.2):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: (std * rng.normal(size=a.shape)).astype(np.float32), tree)


@pytest.fixture(scope="module")
def templates():
  """Shapes of a tiny SD-v1-like UNet and CLIP text encoder (nothing compiled)."""
  x, t, ctx = np.zeros((1, 8, 8, 4), np.float32), np.zeros((1,), np.float32), np.zeros((1, 3, 24), np.float32)
  unet = jax.eval_shape(UNetModel(**UNET_FIELDS).init, jax.random.key(0), x, t, ctx)
  clip = CLIPTextModel(vocab_size=32, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=8)
  text = jax.eval_shape(clip.init, jax.random.key(0), np.zeros((1, 8), np.int32))
  return unet, text


@pytest.fixture(scope="module")
def adapters(templates):
  unet, text = templates
  return (random_tree(init_adapters(unet, CONFIG, jax.random.key(0)), seed=1),
          random_tree(init_adapters(text, CONFIG, jax.random.key(1)), seed=2))


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree))


def assert_same(a, b):
  fa, fb = _flat(a), _flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg="/".join(k))


def test_round_trip_is_exact(tmp_path, templates, adapters):
  unet, text = templates
  path = save_lora(tmp_path / "lora", CONFIG, UNET_FIELDS, unet=adapters[0], text_encoder=adapters[1])
  assert path.endswith("pytorch_lora_weights.safetensors")
  back = load_lora(tmp_path / "lora", UNET_FIELDS, unet, text_params=text)
  assert back.config == CONFIG
  assert_same(back.unet, adapters[0])
  assert_same(back.text_encoder, adapters[1])


def test_file_layout_is_diffusers(templates, adapters):
  state, metadata = lora_state_dict(CONFIG, UNET_FIELDS, unet=adapters[0], text_encoder=adapters[1])
  a = adapters[0]["params"]
  q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
  np.testing.assert_array_equal(state[f"{q}.lora_A.weight"],
                                a["input_blocks_1_1"]["transformer_blocks_0"]["attn1"]["to_q"]["down"].T)
  np.testing.assert_array_equal(state[f"{q}.lora_B.weight"],
                                a["input_blocks_1_1"]["transformer_blocks_0"]["attn1"]["to_q"]["up"].T)
  conv = a["input_blocks_1_0"]["in_layers_2"]  # a 3x3 conv: A is a (r, in, 3, 3) conv, B a 1x1 conv
  np.testing.assert_array_equal(state["unet.down_blocks.0.resnets.0.conv1.lora_A.weight"],
                                conv["down"].transpose(3, 2, 0, 1))
  assert state["unet.down_blocks.0.resnets.0.conv1.lora_B.weight"].shape == (16, 3, 1, 1)
  assert state["unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0.lora_B.weight"].shape == (16, 3)
  assert state["unet.down_blocks.0.downsamplers.0.conv.lora_A.weight"].shape == (3, 16, 3, 3)
  assert "text_encoder.text_model.encoder.layers.1.self_attn.out_proj.lora_A.weight" in state
  assert all(k.startswith(("unet.", "text_encoder.")) for k in state)
  assert metadata["ss_network_alpha"] == "5.0" and '"unet.lora_alpha": 5.0' in metadata["lora_adapter_metadata"]


def _kohya(state, metadata_alpha):
  """Our diffusers-layout state dict in kohya's layout (module dots as underscores, a per-module alpha)."""
  out = {}
  for k, v in state.items():
    component, rest = k.split(".", 1)
    module, factor = rest.rsplit(".lora_", 1)
    name = ("lora_unet_" if component == "unet" else "lora_te_") + module.replace(".", "_")
    out[f"{name}.lora_{'down' if factor.startswith('A') else 'up'}.weight"] = v
    out[f"{name}.alpha"] = np.asarray(metadata_alpha, np.float32)
  return out


def test_kohya_and_older_diffusers_layouts_read_the_same(templates, adapters):
  unet, text = templates
  state, _ = lora_state_dict(CONFIG, UNET_FIELDS, unet=adapters[0], text_encoder=adapters[1])
  kohya = lora_from_state_dict(_kohya(state, 5.0), {}, UNET_FIELDS, unet, text_params=text)
  assert kohya.config.alpha == 5.0 and kohya.config.rank == 3
  assert_same(kohya.unet, adapters[0])
  assert_same(kohya.text_encoder, adapters[1])
  # diffusers' LoRACompatible layers and attention processors (and, with no alpha anywhere, alpha = rank).
  older = {}
  for k, v in state.items():
    k = k.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight")
    for proj in ("to_q", "to_k", "to_v"):
      k = k.replace(f".{proj}.lora.", f".processor.{proj}_lora.")
    older[k.replace(".to_out.0.lora.", ".processor.to_out_lora.")] = v
  assert any(".processor.to_out_lora.up.weight" in k for k in older)
  back = lora_from_state_dict(older, None, UNET_FIELDS, unet, text_params=text)
  assert back.config.alpha == 3.0  # peft's convention without alpha: scale 1
  assert_same(back.unet, adapters[0])


def test_per_module_alphas_fold_into_up(templates, adapters):
  """A module saved with another alpha keeps its own scale: merged weights equal float64 W + alpha_m / r * A B."""
  unet, _ = templates
  state, _ = lora_state_dict(CONFIG, UNET_FIELDS, unet=adapters[0])
  kohya = _kohya(state, 5.0)
  odd = "lora_unet_mid_block_attentions_0_proj_in"
  kohya[f"{odd}.alpha"] = np.asarray(1.5, np.float32)
  back = lora_from_state_dict(kohya, {}, UNET_FIELDS, unet)
  assert back.config.alpha == 5.0
  params = random_tree({"params": {"middle_block_1": {"proj_in": unet["params"]["middle_block_1"]["proj_in"]}}}, 3)
  odd_adapter = {"proj_in": back.unet["params"]["middle_block_1"]["proj_in"]}
  merged = apply_adapters(params, {"params": {"middle_block_1": odd_adapter}}, back.config)
  pair = adapters[0]["params"]["middle_block_1"]["proj_in"]
  w = np.asarray(params["params"]["middle_block_1"]["proj_in"]["kernel"], np.float64)
  delta = np.tensordot(np.asarray(pair["down"], np.float64), np.asarray(pair["up"], np.float64)[0, 0], axes=1)
  got = np.asarray(merged["params"]["middle_block_1"]["proj_in"]["kernel"], np.float64)
  np.testing.assert_allclose(got, w + 1.5 / 3 * delta, rtol=1e-5, atol=1e-6)


def test_every_problem_in_one_error(tmp_path, templates, adapters):
  unet, text = templates
  state, metadata = lora_state_dict(CONFIG, UNET_FIELDS, unet=adapters[0], text_encoder=adapters[1])
  q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
  state[f"{q}.lora_A.weight"] = np.zeros((3, 17), np.float32)  # in-features 17, the layer has 16
  del state["unet.mid_block.attentions.0.proj_out.lora_B.weight"]
  state["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_qq.lora_A.weight"] = np.ones((3, 16))
  state["unet.down_blocks.7.resnets.0.conv1.lora_A.weight"] = np.ones((3, 16, 3, 3))
  state["unet.weird_key"] = np.ones(3)
  path = str(tmp_path / "bad.safetensors")
  save_file({k: np.asarray(v, np.float32) for k, v in state.items()}, path, metadata=metadata)
  with pytest.raises(StateDictMismatchError) as e:
    load_lora(path, UNET_FIELDS, unet, text_params=text)
  message = str(e.value)
  assert path in message
  assert f"{q}.lora_A.weight: file (3, 17) vs model (16, 3)" in message
  assert "unet.mid_block.attentions.0.proj_out.lora_A.weight (its lora_B is missing)" in message
  assert "1 missing" in message and "3 unexpected" in message and "1 shape mismatches" in message
  for stray in ("to_qq.lora_A.weight", "unet.down_blocks.7.resnets.0.conv1.lora_A.weight", "unet.weird_key"):
    assert stray in message, stray
  with pytest.raises(StateDictMismatchError, match="pass text_params"):
    load_lora(path, UNET_FIELDS, unet)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_lora(tmp_path / "nothing.safetensors", UNET_FIELDS, unet)


# ----------------------------------------------------------------------------- parity with diffusers + peft

@pytest.fixture(scope="module")
def sd(tmp_path_factory):
  """A tiny random diffusers SD v1 pipeline (conv proj_in), the same loaded here, and one compiled forward."""
  pytest.importorskip("peft")
  from sd_reference import SD_V1_LIKE, make_sd_folder  # skips without torch / diffusers

  root = tmp_path_factory.mktemp("sd_lora")
  ref = make_sd_folder(root, SD_V1_LIKE, seed=5)
  ours = load_pretrained_pipeline(str(root / "sd"))
  model = ours.model

  @jax.jit
  def forward(params, frozen, ids, z, t):
    ctx = model.cond_stage.encode(frozen["cond"], ids)
    return ctx, model.apply(params, z, t, {"context": ctx})

  rng = np.random.default_rng(0)
  inputs = (rng.integers(0, 64, size=(2, 16)).astype(np.int32), rng.normal(size=(2, 8, 8, 4)).astype(np.float32),
            np.asarray([17, 803], np.int32))
  return ref, root, ours, forward, inputs


def _reference_outputs(unet, text_encoder, inputs):
  from sd_reference import nchw, nhwc, torch

  ids, z, t = inputs
  with torch.no_grad():
    ctx = text_encoder(torch.from_numpy(ids).long())[0]
    eps = unet(nchw(z), torch.from_numpy(t).long(), encoder_hidden_states=ctx).sample
  return ctx.numpy(), nhwc(eps)


def _check(ours_pipe, forward, inputs, ref_ctx, ref_eps, base_eps):
  from sd_reference import assert_close

  ctx, eps = forward(ours_pipe.params, ours_pipe.frozen, *inputs)
  assert_close(ctx, ref_ctx)
  assert_close(eps, ref_eps)
  assert np.abs(np.asarray(eps) - base_eps).max() > 0.05 * np.abs(base_eps).max()  # the LoRA matters


def test_our_file_loads_in_diffusers(sd):
  ref, root, ours, forward, inputs = sd
  _, base_eps = forward(ours.params, ours.frozen, *inputs)
  unet_a = random_tree(init_adapters(ours.params["unet"], CONFIG, jax.random.key(0)), seed=6, std=0.1)
  text_a = random_tree(init_adapters(ours.frozen["cond"], CONFIG, jax.random.key(1)), seed=7, std=0.1)
  path = save_lora(root / "ours.safetensors", CONFIG, ours.model.unet, unet=unet_a, text_encoder=text_a)
  ref.load_lora_weights(path)
  ref_ctx, ref_eps = _reference_outputs(ref.unet, ref.text_encoder, inputs)
  _check(apply_lora_file(ours, path), forward, inputs, ref_ctx, ref_eps, np.asarray(base_eps))


def test_peft_trained_file_loads_here(sd):
  """LoRA made by peft in diffusers (per-module rank and alpha patterns too), saved by diffusers, read by us."""
  ref, root, ours, forward, inputs = sd
  import diffusers
  import transformers
  from peft import LoraConfig, inject_adapter_in_model
  from peft.utils import get_peft_model_state_dict
  from sd_reference import torch

  unet = diffusers.UNet2DConditionModel.from_pretrained(str(root / "sd" / "unet")).eval()
  text = transformers.CLIPTextModel.from_pretrained(str(root / "sd" / "text_encoder")).eval()
  unet.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in",
                                                                  "conv1", "conv_shortcut"],
                              rank_pattern={"conv1": 3}, alpha_pattern={"to_k": 1}))
  # transformers' own add_adapter wants a newer peft than PyPI has; inject_adapter_in_model is what it wraps.
  text = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj", "v_proj", "fc1"]), text)
  gen = torch.Generator().manual_seed(8)
  with torch.no_grad():
    for module in (unet, text):
      for name, p in module.named_parameters():
        if "lora_B" in name:
          p.copy_(0.1 * torch.randn(p.shape, generator=gen))
  _, base_eps = forward(ours.params, ours.frozen, *inputs)
  ref_ctx, ref_eps = _reference_outputs(unet, text, inputs)
  diffusers.StableDiffusionPipeline.save_lora_weights(
      str(root / "peft"), unet_lora_layers=get_peft_model_state_dict(unet),
      text_encoder_lora_layers=get_peft_model_state_dict(text),
      unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
      text_encoder_lora_adapter_metadata=text.peft_config["default"].to_dict(), safe_serialization=True)

  _check(apply_lora_file(ours, root / "peft"), forward, inputs, ref_ctx, ref_eps, np.asarray(base_eps))
  weights = load_lora(root / "peft", ours.model.unet, ours.params["unet"], text_params=ours.frozen["cond"])
  q = weights.unet["params"]["input_blocks_1_1"]["transformer_blocks_0"]["attn1"]["to_q"]
  peft_q = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
  np.testing.assert_array_equal(q["down"], peft_q.lora_A["default"].weight.detach().numpy().T)
  np.testing.assert_array_equal(q["up"], peft_q.lora_B["default"].weight.detach().numpy().T)
  assert weights.unet["params"]["input_blocks_1_0"]["in_layers_2"]["down"].shape == (3, 3, 32, 3)  # rank_pattern
