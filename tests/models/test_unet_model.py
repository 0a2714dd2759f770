"""UNetModel: every family at tiny width, remat, dtypes, head derivation, input checks."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import subjaxprs

from ldm_jax.interop import naming
from ldm_jax.models.unet import UNET_PRESETS, UNetModel, attention_heads, unet_preset

B, HW = 2, 8
TINY = dict(model_channels=16, num_res_blocks=1, norm_num_groups=8)
# Each family at tiny width, with the keys its reference state dict must contain.
FAMILIES = {
    "sd_v1": (
        unet_preset("sd_v1", **TINY, channel_mult=(1, 2), attention_resolutions=(1,), num_heads=4, context_dim=24),
        ["input_blocks.1.1.proj_in.weight", "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight",
         "input_blocks.2.0.op.weight", "output_blocks.1.1.conv.weight", "output_blocks.2.1.proj_out.weight"],
    ),
    "sd_v2": (
        unet_preset("sd_v2", **TINY, channel_mult=(1, 2), attention_resolutions=(1, 2), num_head_channels=8,
                    context_dim=24),
        ["input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight", "output_blocks.1.2.conv.weight"],
    ),
    "sd_v2_inpaint": (
        unet_preset("sd_v2_inpaint", **TINY, channel_mult=(1, 2), attention_resolutions=(1,), num_head_channels=8,
                    context_dim=24),
        ["input_blocks.0.0.weight"],
    ),
    "class_conditional_legacy_attention": (
        unet_preset("celebahq_vq4", **TINY, channel_mult=(1, 2), attention_resolutions=(2,), num_head_channels=-1,
                    num_heads=2, num_classes=11, use_new_attention_order=True),
        ["label_emb.weight", "input_blocks.3.1.qkv.weight", "middle_block.1.proj_out.weight"],
    ),
    "cin256_v2": (
        unet_preset("cin256_v2", **TINY, channel_mult=(1, 2), attention_resolutions=(2,), context_dim=24),
        ["middle_block.1.transformer_blocks.0.attn2.to_v.weight"],
    ),
    "lsun_churches_kl8": (  # scale-shift norm, resblocks for up/downsampling
        unet_preset("lsun_churches_kl8", **TINY, channel_mult=(1, 2, 2), attention_resolutions=(2, 4)),
        ["input_blocks.2.0.in_layers.0.weight", "output_blocks.1.2.out_layers.3.weight",
         "output_blocks.3.2.in_layers.0.weight",
         "output_blocks.3.0.skip_connection.weight"],
    ),
    "celebahq_vq4": (
        unet_preset("celebahq_vq4", **TINY, channel_mult=(1, 2, 2), attention_resolutions=(2, 4)),
        ["input_blocks.3.1.norm.weight", "output_blocks.5.0.emb_layers.1.weight"],
    ),
}


def example_inputs(fields, seed=0, hw=HW):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, hw, hw, fields["in_channels"])).astype(np.float32)
  t = rng.integers(0, 1000, size=B).astype(np.float32)
  ctx = rng.normal(size=(B, 3, fields["context_dim"])).astype(np.float32) if fields.get("context_dim") else None
  y = rng.integers(0, fields["num_classes"], size=B) if fields.get("num_classes") else None
  return x, t, ctx, y


def random_params(model, inputs, seed=0):
  """Random non-zero parameters (kernels ~ N(0, 1/fan_in)) without compiling init."""
  template = jax.eval_shape(model.init, jax.random.key(0), *inputs)
  rng = np.random.default_rng(seed)

  def sample(s):
    std = 1 / np.sqrt(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 0.3
    return (std * rng.normal(size=s.shape)).astype(np.float32)

  return jax.tree.map(sample, template)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_output_shape_and_reference_names(family):
  fields, expected_keys = FAMILIES[family]
  model = UNetModel(**fields)
  out, variables = jax.eval_shape(lambda *a: model.init_with_output(jax.random.key(0), *a), *example_inputs(fields))
  assert out.shape == (B, HW, HW, fields["out_channels"]) and out.dtype == jnp.float32
  keys = naming.torch_shapes(variables)
  missing = [k for k in expected_keys if k not in keys]
  assert not missing, f"{family}: missing {missing}"


def test_zero_initialised_like_the_reference():
  """The final conv, every ResBlock's last conv and every proj_out start at zero (zero_module); nothing else.

  Read off the layers' initialisers while tracing ``init`` (compiling an init
  costs many seconds on CPU; the zeros initialiser gives zeros by definition).
  """
  fields, _ = FAMILIES["sd_v1"]
  zero_init = {}

  def record(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, (nn.Conv, nn.Dense)) and context.method_name == "__call__":
      zero_init["/".join(module.path)] = module.kernel_init is nn.initializers.zeros_init()
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(UNetModel(**fields).init, jax.random.key(0), *example_inputs(fields))
  assert len(zero_init) > 30
  for path, is_zero in zero_init.items():
    assert is_zero == bool(set(path.split("/")) & {"out_2", "out_layers_3", "proj_out"}), path


@pytest.fixture(scope="module")
def legacy_family():
  """scale-shift norm + resblock up/down + class labels + legacy attention, random weights, compiled."""
  fields = unet_preset(
      "lsun_churches_kl8", **TINY, in_channels=3, out_channels=3, channel_mult=(1, 2), attention_resolutions=(1, 2),
      num_heads=2, num_heads_upsample=4, num_classes=7, dropout=0.5,
  )
  model = UNetModel(**fields)
  inputs = example_inputs(fields)
  return model, random_params(model, inputs), inputs, jax.jit(model.apply)


def test_legacy_family_uses_time_and_class(legacy_family):
  model, params, (x, t, _, y), apply = legacy_family
  out = np.asarray(apply(params, x, t, None, y))  # train=False: dropout off, no rng needed
  assert out.shape == x.shape and np.isfinite(out).all()
  np.testing.assert_array_equal(out, apply(params, x, t, None, y))
  for changed in (apply(params, x, t + 100, None, y), apply(params, x, t, None, (y + 1) % 7)):
    assert np.abs(np.asarray(changed) - out).max() > 1e-3 * np.abs(out).max()


# -- remat ---------------------------------------------------------------------

# One level keeps the three gradient compiles affordable on CPU; it still has
# ResBlocks, a SpatialTransformer (with context and mask) and dropout under remat.
REMAT_FIELDS = dict(
    in_channels=4, out_channels=4, model_channels=8, num_res_blocks=1, channel_mult=(1,), attention_resolutions=(),
    num_heads=2, use_spatial_transformer=True, context_dim=8, norm_num_groups=4, dropout=0.2,
)


@pytest.fixture(scope="module")
def remat_setup():
  x, t, ctx, _ = example_inputs(REMAT_FIELDS, hw=4)
  mask = np.array([[1, 1, 0], [1, 1, 1]], bool)
  params = random_params(UNetModel(**REMAT_FIELDS), (x, t, ctx))
  weights = np.random.default_rng(5).normal(size=x.shape).astype(np.float32)

  @functools.cache  # one compile per policy, shared by the tests
  def value_and_grad(policy):
    model = UNetModel(**REMAT_FIELDS, remat_policy=policy)

    def loss(p, rng):
      out = model.apply(p, x, t, ctx, context_mask_BxL=mask, train=True, rngs={"dropout": rng})
      return jnp.sum(out * weights)

    return jax.jit(jax.value_and_grad(loss))

  return params, value_and_grad, (x, t, ctx)


@pytest.mark.parametrize("policy", ["full", "save_dots"])
def test_remat_gives_same_params_outputs_and_gradients(remat_setup, policy):
  params, value_and_grad, inputs = remat_setup
  rematted = UNetModel(**REMAT_FIELDS, remat_policy=policy)
  assert jax.tree.structure(jax.eval_shape(rematted.init, jax.random.key(0), *inputs)) == jax.tree.structure(params)
  assert "remat2" in _primitives(lambda p: rematted.apply(p, *inputs), params)

  rng = jax.random.key(3, impl="rbg")  # rbg dropout masks compile faster than threefry's on CPU
  (loss_ref, grads_ref), (loss, grads) = value_and_grad("none")(params, rng), value_and_grad(policy)(params, rng)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5 * np.abs(g_ref).max())
  # Dropout is live in training (another rng, another loss), and remat replays the same mask.
  other_rng = jax.random.key(4, impl="rbg")
  assert abs(float(value_and_grad(policy)(params, other_rng)[0]) - float(loss)) > 1e-3 * abs(float(loss))


def test_no_remat_means_no_checkpoint(remat_setup):
  params, _, inputs = remat_setup
  assert "remat2" not in _primitives(lambda p: UNetModel(**REMAT_FIELDS).apply(p, *inputs), params)


# -- dtypes --------------------------------------------------------------------


def _equations(jaxpr):
  """Every equation of a jaxpr, those of nested jaxprs (jit, remat, ...) included."""
  yield from jaxpr.eqns
  for sub in subjaxprs(jaxpr):
    yield from _equations(sub)


def _primitives(fn, *args) -> list[str]:
  return [eqn.primitive.name for eqn in _equations(jax.make_jaxpr(fn)(*args).jaxpr)]


def test_bfloat16_compute_with_float32_params():
  fields, _ = FAMILIES["sd_v2"]
  model = UNetModel(**fields, dtype=jnp.bfloat16)
  inputs = example_inputs(fields)
  params = jax.eval_shape(model.init, jax.random.key(0), *inputs)
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  closed = jax.make_jaxpr(lambda p: model.apply(p, *inputs))(params)
  assert closed.out_avals[0].dtype == jnp.float32  # returned in the input's dtype
  found = [
      (eqn.primitive.name, str(eqn.invars[0].aval.dtype))
      for eqn in _equations(closed.jaxpr)
      if eqn.primitive.name in ("conv_general_dilated", "dot_general")
  ]
  float32_ops = [f for f in found if f[1] != "bfloat16"]
  # Only the timestep-embedding MLP (time_embed_0, time_embed_2) stays float32.
  assert float32_ops == [("dot_general", "float32")] * 2, float32_ops
  assert len(found) > 30

  stored = UNetModel(**fields, param_dtype=jnp.bfloat16)
  assert {leaf.dtype for leaf in jax.tree.leaves(jax.eval_shape(stored.init, jax.random.key(0), *inputs))} == {
      jnp.dtype(jnp.bfloat16)
  }


# -- head derivation (openaimodel.UNetModel.__init__) ----------------------------


def test_attention_heads_follow_the_reference():
  sd_v1 = dict(num_heads=8, num_head_channels=-1, legacy=False, use_spatial_transformer=True)
  assert [attention_heads(ch, **sd_v1) for ch in (320, 640, 1280)] == [(8, 40), (8, 80), (8, 160)]
  sd_v2 = dict(num_heads=-1, num_head_channels=64, legacy=False, use_spatial_transformer=True)
  assert [attention_heads(ch, **sd_v2) for ch in (320, 640, 1280)] == [(5, 64), (10, 64), (20, 64)]
  vq_f4 = dict(num_heads=-1, num_head_channels=32)  # legacy AttentionBlock: C // 32 heads
  assert [attention_heads(ch, **vq_f4) for ch in (224, 448, 672)] == [(7, 32), (14, 32), (21, 32)]
  cin = dict(num_heads=1, num_head_channels=-1, use_spatial_transformer=True)  # legacy: one head of size C
  assert attention_heads(192, **cin) == (1, 192)
  # num_heads_upsample reaches legacy AttentionBlocks of the output blocks only ...
  legacy = dict(num_heads=4, num_head_channels=-1, num_heads_upsample=2)
  assert attention_heads(64, **legacy) == (4, 16)
  assert attention_heads(64, **legacy, upsample=True) == (2, 32)
  # ... and is ignored once legacy=False has turned num_heads into a head size.
  assert attention_heads(64, **legacy, legacy=False, upsample=True) == (4, 16)


# -- presets and errors ----------------------------------------------------------


def test_presets_follow_the_reference_configs():
  assert unet_preset("sd_v1_inpaint")["in_channels"] == 9 and unet_preset("sd_v2_inpaint")["in_channels"] == 9
  assert unet_preset("txt2img_1p4b")["context_dim"] == 1280
  churches = unet_preset("lsun_churches_kl8")
  assert churches["use_scale_shift_norm"] and churches["resblock_updown"]
  assert churches["attention_resolutions"] == (1, 2, 4, 8) and churches["channel_mult"] == (1, 2, 2, 4, 4)
  assert unet_preset("ffhq_vq4") == unet_preset("celebahq_vq4") == unet_preset("lsun_bedrooms_vq4")
  assert unet_preset("sd_v1", model_channels=32)["model_channels"] == 32
  for name in UNET_PRESETS:
    UNetModel(**unet_preset(name))._check_fields()
  with pytest.raises(ValueError, match="unknown UNet preset 'sd_v3'"):
    unet_preset("sd_v3")
  with pytest.raises(ValueError, match="unknown UNetModel fields.*'width'"):
    unet_preset("sd_v1", width=3)


@pytest.mark.parametrize(
    "change,inputs_change,message",
    [
        (dict(num_heads=-1), {}, "set num_heads or num_head_channels"),
        (dict(remat_policy="some"), {}, "remat_policy must be one of"),
        (dict(context_dim=None), {}, "needs context_dim"),
        (dict(num_res_blocks=(1, 1)), {}, "one entry per channel_mult level"),
        (dict(num_classes="sequential"), {}, "num_classes must be a positive int"),
        ({}, dict(x=np.zeros((B, HW, HW, 3), np.float32)), r"x must be \(B, H, W, 4\)"),
        ({}, dict(x=np.zeros((B, 6, 6, 4), np.float32)), "multiples of 4"),
        ({}, dict(ctx=None), r"context must be \(B=2, L, 24\)"),
        ({}, dict(ctx=np.zeros((B, 3, 7), np.float32)), r"context must be \(B=2, L, 24\)"),
        ({}, dict(mask=np.ones((B, 4), bool)), "context_mask must be"),
        ({}, dict(y=np.zeros((B,), np.int32)), "if and only if the model is class-conditional"),
    ],
)
def test_bad_configuration_or_input_is_named(change, inputs_change, message):
  fields = unet_preset("sd_v1", **TINY, channel_mult=(1, 2, 2), attention_resolutions=(1,), context_dim=24)
  fields.update(change)
  x, t, ctx, _ = example_inputs(unet_preset("sd_v1", **TINY, context_dim=24))
  inputs = dict(x=x, t=t, ctx=ctx, y=None, mask=None) | inputs_change
  model = UNetModel(**fields)
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(
        lambda: model.init(jax.random.key(0), inputs["x"], inputs["t"], inputs["ctx"], inputs["y"], inputs["mask"])
    )


def test_class_labels_are_checked():
  fields, _ = FAMILIES["class_conditional_legacy_attention"]
  x, t, _, y = example_inputs(fields)
  model = UNetModel(**fields)
  for bad_y, message in ((None, "if and only if"), (y.astype(np.float32), "integer class labels"), (y[:1], r"\(2,\)")):
    with pytest.raises(ValueError, match=message):
      jax.eval_shape(model.init, jax.random.key(0), x, t, None, bad_y)
  with pytest.raises(ValueError, match="no cross-attention"):
    jax.eval_shape(model.init, jax.random.key(0), x, t, np.zeros((B, 3, 8), np.float32), y)
