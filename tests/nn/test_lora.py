"""LoRA math: adapters against float64 NumPy (dense and HWIO conv), gradients, and merged vs two-branch UNet forward.

Tolerances: float32 results vs float64 references within 1e-5 relative
(max |ours - ref| / max |ref|); the merged UNet vs LoRA's unmerged
two-branch forward within 2e-5 relative.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from ldm_jax.models.unet import UNetModel, unet_preset
from ldm_jax.nn.lora import LoRAConfig, adapter_param_count, apply_adapters, init_adapters, merge, target_paths

ALL_GROUPS = ("attention", "proj", "ff", "conv", "time_embedding")
FIELDS = unet_preset("sd_v1", model_channels=16, num_res_blocks=1, norm_num_groups=8, channel_mult=(1, 2),
                     attention_resolutions=(1,), num_heads=4, context_dim=24)


def rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def randomize(tree, seed: int, std: float = 0.5):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: (std * rng.normal(size=a.shape)).astype(np.float32), tree)


def unet_inputs(seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(2, 8, 8, 4)).astype(np.float32), np.asarray([3.0, 700.0], np.float32),
          rng.normal(size=(2, 3, 24)).astype(np.float32))


@pytest.fixture(scope="module")
def unet():
  """Tiny SD-v1-like UNet (1x1-conv proj_in, a stride-2 downsample), random non-zero weights, no init compile."""
  model = UNetModel(**FIELDS)
  template = jax.eval_shape(model.init, jax.random.key(0), *unet_inputs())
  rng = np.random.default_rng(1)

  def sample(s):
    std = 1 / np.sqrt(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 0.3
    return (std * rng.normal(size=s.shape)).astype(np.float32)

  return model, jax.tree.map(sample, template)


def test_targets_select_the_named_layers(unet):
  _, params = unet
  paths = {"/".join(p) for p in target_paths(params, LoRAConfig(targets=ALL_GROUPS))}
  for expected in ("params/input_blocks_1_1/transformer_blocks_0/attn2/to_k", "params/middle_block_1/proj_in",
                   "params/output_blocks_2_1/transformer_blocks_0/ff/net_0/proj", "params/input_blocks_2_0/op",
                   "params/output_blocks_1_1/conv", "params/input_blocks_0_0", "params/out_2",
                   "params/output_blocks_0_0/skip_connection", "params/time_embed_2",
                   "params/middle_block_0/emb_layers_1"):
    assert expected in paths, expected
  kernels = {"/".join(p[:-1]) for p in traverse_util.flatten_dict(params) if p[-1] == "kernel"}
  assert paths == kernels  # together the groups cover every UNet kernel
  attention = {"/".join(p) for p in target_paths(params, LoRAConfig())}
  assert len(attention) == 4 * 2 * 4 and all(p.rsplit("/", 1)[1] in ("to_q", "to_k", "to_v", "to_out_0")
                                             for p in attention)


def test_fresh_adapters_leave_the_model_unchanged(unet):
  _, params = unet
  config = LoRAConfig(rank=3, alpha=6.0, targets=ALL_GROUPS)
  adapters = init_adapters(params, config, jax.random.key(0))
  merged = merge(params, adapters, config)
  flat, flat_merged = traverse_util.flatten_dict(params), traverse_util.flatten_dict(merged)
  assert flat.keys() == flat_merged.keys()
  for k in flat:
    np.testing.assert_array_equal(flat_merged[k], flat[k], err_msg="/".join(k))
  # LoRA's init: up zero, down kaiming-uniform within 1/sqrt(fan_in) and not degenerate.
  for module, pair in _pairs(adapters).items():
    assert not np.asarray(pair["up"]).any()
    down = np.asarray(pair["down"])
    bound = 1 / np.sqrt(np.prod(down.shape[:-1]))
    assert np.abs(down).max() <= bound and np.abs(down).max() > 0.5 * bound, module
  n = sum(int(np.prod(p["down"].shape) + np.prod(p["up"].shape)) for p in _pairs(adapters).values())
  assert adapter_param_count(adapters) == n
  gauss = init_adapters(params, LoRAConfig(rank=8, init="gaussian"), jax.random.key(1))
  downs = np.concatenate([np.ravel(p["down"]) for p in _pairs(gauss).values()])
  assert abs(downs.std() - 1 / 8) < 0.1 / 8


def _pairs(adapters):
  out = {}
  for path, v in traverse_util.flatten_dict(adapters).items():
    out.setdefault(path[:-1], {})[path[-1]] = v
  return out


@pytest.mark.parametrize("kernel_shape", [(6, 5), (3, 3, 4, 7), (1, 1, 4, 7)], ids=["dense", "conv3x3", "conv1x1"])
def test_apply_matches_float64(kernel_shape):
  rank, alpha, scale = 3, 5.0, 0.7
  rng = np.random.default_rng(0)
  w = rng.normal(size=kernel_shape).astype(np.float32)
  params = {"params": {"layer": {"kernel": w, "bias": rng.normal(size=kernel_shape[-1]).astype(np.float32)}}}
  config = LoRAConfig(rank=rank, alpha=alpha, targets=("layer",))
  adapters = randomize(init_adapters(params, config, jax.random.key(0)), seed=1)
  a = np.asarray(adapters["params"]["layer"]["down"], np.float64)
  b = np.asarray(adapters["params"]["layer"]["up"], np.float64)
  if len(kernel_shape) == 2:
    assert a.shape == (6, rank) and b.shape == (rank, 5)
    delta = a @ b
  else:  # down: conv (kh, kw, in, r); up: 1x1 conv (1, 1, r, out)
    assert a.shape == (*kernel_shape[:3], rank) and b.shape == (1, 1, rank, kernel_shape[3])
    delta = np.tensordot(a, b[0, 0], axes=([3], [0]))
  expected = w.astype(np.float64) + scale * alpha / rank * delta
  out = apply_adapters(params, adapters, config, scale=scale)
  assert rel_err(out["params"]["layer"]["kernel"], expected) < 1e-6
  np.testing.assert_array_equal(out["params"]["layer"]["bias"], params["params"]["layer"]["bias"])


def _conv_nhwc_f64(x, k, stride, pad):
  """Plain float64 cross-correlation (PyTorch Conv2d semantics), NHWC x HWIO."""
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  kh, kw = k.shape[:2]
  ho, wo = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], ho, wo, k.shape[-1]))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, i:i + stride * ho:stride, j:j + stride * wo:stride, :]
      out += np.einsum("bhwc,co->bhwo", patch, k[i, j])
  return out


@pytest.mark.parametrize("stride,pad", [(1, 1), (2, 1)], ids=["same", "downsample"])
def test_merged_conv_is_lora_two_branch_conv(stride, pad):
  """conv(x, W + s A·B) == conv(x, W) + s · conv1x1(conv(x, A), B): LoRA's Conv2d forward, in float64."""
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 7, 6, 4))
  w, a, b = (rng.normal(size=s).astype(np.float32) for s in ((3, 3, 4, 5), (3, 3, 4, 2), (1, 1, 2, 5)))
  config = LoRAConfig(rank=2, alpha=3.0, targets=("c",))
  merged = apply_adapters({"c": {"kernel": w}}, {"c": {"down": a, "up": b}}, config)["c"]["kernel"]
  w, a, b = (t.astype(np.float64) for t in (w, a, b))
  two_branch = _conv_nhwc_f64(x, w, stride, pad) + 1.5 * _conv_nhwc_f64(_conv_nhwc_f64(x, a, stride, pad), b, 1, 0)
  assert rel_err(_conv_nhwc_f64(x, np.asarray(merged, np.float64), stride, pad), two_branch) < 1e-5


def test_only_adapters_train():
  """Gradients through apply_adapters reach exactly the adapters, with LoRA's closed-form values."""
  rng = np.random.default_rng(3)
  params = {"q": {"kernel": rng.normal(size=(6, 4)).astype(np.float32), "bias": np.ones(4, np.float32)},
            "other": {"kernel": rng.normal(size=(4, 4)).astype(np.float32)}}
  config = LoRAConfig(rank=2, alpha=4.0, targets=("^q$",))
  adapters = init_adapters(params, config, jax.random.key(0))
  assert set(adapters) == {"q"}
  x, g = rng.normal(size=(5, 6)).astype(np.float32), rng.normal(size=(5, 4)).astype(np.float32)

  def loss(adapters):
    p = apply_adapters(params, adapters, config)
    return jnp.sum((x @ p["q"]["kernel"] + p["q"]["bias"]) @ p["other"]["kernel"] * g)

  s = config.alpha / config.rank
  grads = jax.grad(loss)(adapters)
  assert jax.tree.structure(grads) == jax.tree.structure(adapters)
  a = np.asarray(adapters["q"]["down"], np.float64)
  upstream = x.astype(np.float64).T @ (g @ params["other"]["kernel"].T.astype(np.float64))  # dL/dW (6, 4)
  assert rel_err(grads["q"]["up"], s * a.T @ upstream) < 1e-5
  assert not np.asarray(grads["q"]["down"]).any()  # B = 0 at the start: A gets no gradient yet, as in LoRA

  opt = optax.sgd(0.1)
  state = opt.init(adapters)
  for _ in range(2):
    updates, state = opt.update(jax.grad(loss)(adapters), state)
    adapters = optax.apply_updates(adapters, updates)
  assert np.asarray(adapters["q"]["up"]).any() and np.abs(np.asarray(adapters["q"]["down"]) - a).max() > 0
  merged = apply_adapters(params, adapters, config)
  np.testing.assert_array_equal(merged["other"]["kernel"], params["other"]["kernel"])
  np.testing.assert_array_equal(merged["q"]["bias"], params["q"]["bias"])
  assert np.abs(np.asarray(merged["q"]["kernel"]) - params["q"]["kernel"]).max() > 1e-4


def _two_branch_forward(model, params, adapters, config, inputs):
  """LoRA as PyTorch/peft run it: every adapted Dense/Conv computes base(x) + s * up(down(x))."""
  pairs = _pairs(adapters)

  def add_branch(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    pair = pairs.get(("params", *module.path))
    if pair is None or context.method_name != "__call__":
      return out
    x, rank = args[0], pair["down"].shape[-1]
    if isinstance(module, nn.Conv):
      down = nn.Conv(rank, module.kernel_size, strides=module.strides, padding=module.padding, use_bias=False)
      up = nn.Conv(module.features, (1, 1), use_bias=False)
    else:
      down, up = nn.Dense(rank, use_bias=False), nn.Dense(module.features, use_bias=False)
    h = down.apply({"params": {"kernel": pair["down"]}}, x)
    return out + config.alpha / rank * up.apply({"params": {"kernel": pair["up"]}}, h)

  with nn.intercept_methods(add_branch):
    return model.apply(params, *inputs)


def test_merged_unet_equals_two_branch_forward(unet):
  model, params = unet
  config = LoRAConfig(rank=2, alpha=3.0, targets=ALL_GROUPS)
  adapters = randomize(init_adapters(params, config, jax.random.key(0)), seed=4, std=0.3)
  inputs = unet_inputs(seed=5)
  forward = jax.jit(model.apply)
  merged = forward(merge(params, adapters, config), *inputs)
  two_branch = jax.jit(lambda p, a, *i: _two_branch_forward(model, p, a, config, i))(params, adapters, *inputs)
  base = forward(params, *inputs)
  assert rel_err(merged, base) > 1e-2  # the adapters matter
  assert rel_err(merged, two_branch) < 2e-5


def test_bad_configs_and_adapters_are_named():
  with pytest.raises(ValueError, match=r"rank=0.*alpha=-1.*init='zeros'"):
    LoRAConfig(rank=0, alpha=-1, init="zeros")
  with pytest.raises(ValueError, match="neither a group"):
    LoRAConfig(targets=("attn(",))
  params = {"params": {"to_q": {"kernel": np.ones((4, 6), np.float32)}, "emb": {"embedding": np.ones((3, 4))}}}
  with pytest.raises(ValueError, match="match no kernel"):
    init_adapters(params, LoRAConfig(targets=("proj",)), jax.random.key(0))
  config = LoRAConfig(rank=2, targets=("to_q",))
  bad = {"params": {"to_q": {"down": np.ones((5, 2)), "up": np.ones((2, 6))},
                    "to_k": {"down": np.ones((4, 2)), "up": np.ones((2, 6))}}}
  with pytest.raises(ValueError, match=r"(?s)to_q: down \(5, 2\).*fit kernel \(4, 6\).*to_k: no such kernel"):
    apply_adapters(params, bad, config)
