"""The generic PyTorch <-> Flax rename, checked on real layers of both libraries."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.interop import naming


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(6, (3, 3), padding=1, name="in_layers_2")(x)
    x = nn.GroupNorm(num_groups=2, name="norm")(x)
    x = nn.Conv(6, (1, 1), name="proj_in")(x)
    x = nn.BatchNorm(use_running_average=True, name="bn")(x)
    return nn.Dense(5, name="to_out_0")(x)


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = _Block(name="input_blocks_1_0")(x)
    x = _Block(name="block_1")(nn.Dense(4, name="lin")(x))
    return _Mid(name="mid")(x)


class _Mid(nn.Module):
  @nn.compact
  def __call__(self, x):
    return _Block(name="block_1")(x)


def test_module_path_rule():
  assert naming.torch_key_to_module_path("input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight") == (
      ("input_blocks_1_1", "transformer_blocks_0", "attn1", "to_q"),
      "weight",
  )
  assert naming.flax_name_to_torch("input_blocks_1_1") == "input_blocks.1.1"
  assert naming.flax_name_to_torch("block_1", parent="mid") == "block_1"
  assert naming.flax_name_to_torch("block_1", parent="down_0") == "block.1"
  assert naming.flax_name_to_torch("attn1") == "attn1"


@pytest.fixture(scope="module")
def net_and_vars():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 5, 5, 3)), jnp.float32)
  shapes = jax.eval_shape(_Net().init, jax.random.key(1), x)  # nothing compiled
  variables = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), shapes)
  return x, variables


def test_round_trip_is_exact(net_and_vars):
  _, variables = net_and_vars
  sd = naming.flax_to_torch(variables, add_prefix="model.")
  assert sd["model.input_blocks.1.0.in_layers.2.weight"].shape == (6, 3, 3, 3)
  assert sd["model.block.1.to_out.0.weight"].shape == (5, 6)
  assert "model.block.1.bn.running_var" in sd and "model.mid.block_1.bn.running_var" in sd
  back = naming.torch_to_flax(sd, variables, strip_prefix="model.")
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, variables))


def test_matches_pytorch_layers(net_and_vars):
  torch = pytest.importorskip("torch")
  x, variables = net_and_vars
  sd = {k: torch.tensor(v) for k, v in naming.flax_to_torch(variables).items()}
  conv = torch.nn.Conv2d(3, 6, 3, padding=1)
  prefix = "input_blocks.1.0.in_layers.2."
  conv.load_state_dict({"weight": sd[prefix + "weight"], "bias": sd[prefix + "bias"]})
  ours = nn.Conv(6, (3, 3), padding=1).apply(
      {"params": variables["params"]["input_blocks_1_0"]["in_layers_2"]}, x
  )
  ref = conv(torch.tensor(np.asarray(x)).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
  np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-5)


def test_dense_and_1x1_conv_convert_into_each_other(net_and_vars):
  _, variables = net_and_vars
  sd = naming.flax_to_torch(variables)
  sd["block.1.proj_in.weight"] = sd["block.1.proj_in.weight"][:, :, 0, 0]  # as a Linear
  back = naming.torch_to_flax(sd, variables)
  np.testing.assert_array_equal(
      back["params"]["block_1"]["proj_in"]["kernel"], variables["params"]["block_1"]["proj_in"]["kernel"]
  )


def test_all_problems_reported_together(net_and_vars):
  _, variables = net_and_vars
  sd = naming.flax_to_torch(variables)
  del sd["lin.bias"]
  sd["extra.weight"] = np.ones(3)
  sd["block.1.to_out.0.weight"] = np.ones((7, 6), np.float32)
  with pytest.raises(naming.StateDictMismatchError) as err:
    naming.torch_to_flax(sd, jax.eval_shape(lambda: variables), what="test file")
  msg = str(err.value)
  assert "params/lin/bias" in msg and "extra.weight" in msg and "block.1.to_out.0.weight" in msg
  assert "(7, 6)" in msg


def test_torch_shapes_agree_with_conversion(net_and_vars):
  _, variables = net_and_vars
  shapes = naming.torch_shapes(jax.eval_shape(lambda: variables))
  assert shapes == {k: v.shape for k, v in naming.flax_to_torch(variables).items()}


def test_exported_weights_survive_safetensors(net_and_vars, tmp_path):
  from safetensors.numpy import load_file, save_file

  _, variables = net_and_vars
  sd = naming.flax_to_torch(variables)
  save_file(sd, str(tmp_path / "w.safetensors"))
  back = load_file(str(tmp_path / "w.safetensors"))
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k], v)
