"""Class embedder, null-class dropout, spatial rescaler and layout tokens.

References: NumPy (exact lookups, float64 resampling), PyTorch's
``F.interpolate`` / 1x1 conv, the binomial law of the dropout count, and
taming-transformers' token formula worked out by hand.
"""

import jax
import numpy as np
import pytest
from test_cond_helpers import assert_close, random_variables

from ldm_jax.interop import naming
from ldm_jax.models.conditioners import (
    ClassEmbedder,
    LayoutEncoder,
    SpatialRescaler,
    drop_labels_to_null,
    layout_to_tokens,
    layout_vocab_size,
    tokens_to_layout,
)

# ----------------------------------------------------------------------------- class embedder


def test_class_embedder_looks_up_one_context_token_per_label():
  module = ClassEmbedder(embed_dim=16, n_classes=1001)  # cin256 with a null class
  labels = np.random.default_rng(0).integers(0, 1001, size=5).astype(np.int32)
  variables = random_variables(module, labels)
  out = module.apply(variables, labels)
  table = naming.flax_to_torch(variables, add_prefix="cond_stage_model.")["cond_stage_model.embedding.weight"]
  assert table.shape == (1001, 16)
  np.testing.assert_array_equal(out, table[labels][:, None, :])
  assert module.null_class == 1000
  with pytest.raises(ValueError, match=r"integer labels of shape \(batch,\)"):
    module.apply(variables, labels[:, None])


def test_null_class_dropout_rate_is_binomial():
  n, p, null = 10_000, 0.1, 1000
  labels = np.random.default_rng(1).integers(0, 1000, size=n).astype(np.int32)
  dropped = np.asarray(drop_labels_to_null(jax.random.key(0), labels, p, null))
  is_null = dropped == null
  # Binomial(10000, 0.1): mean 1000, std 30; accept 4 std.
  assert abs(is_null.sum() - n * p) <= 4 * np.sqrt(n * p * (1 - p))
  np.testing.assert_array_equal(dropped[~is_null], labels[~is_null])
  assert np.all(np.asarray(drop_labels_to_null(jax.random.key(0), labels, 1.0, null)) == null)
  np.testing.assert_array_equal(drop_labels_to_null(jax.random.key(0), labels, 0.0, null), labels)
  with pytest.raises(ValueError, match="drop probability"):
    drop_labels_to_null(jax.random.key(0), labels, 1.5, null)


# ----------------------------------------------------------------------------- spatial rescaler


def numpy_resize(x, multiplier, method):
  """One F.interpolate(scale_factor=multiplier) step on NHWC, pixel by pixel, float64."""
  b, h, w, c = x.shape
  oh, ow = int(np.floor(h * multiplier)), int(np.floor(w * multiplier))
  out = np.zeros((b, oh, ow, c))
  for i in range(oh):
    for j in range(ow):
      if method == "nearest":
        out[:, i, j] = x[:, min(int(i / multiplier), h - 1), min(int(j / multiplier), w - 1)]
        continue
      sy, sx = max((i + 0.5) / multiplier - 0.5, 0), max((j + 0.5) / multiplier - 0.5, 0)
      y0, x0 = int(sy), int(sx)
      y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
      dy, dx = sy - y0, sx - x0
      out[:, i, j] = ((1 - dy) * ((1 - dx) * x[:, y0, x0] + dx * x[:, y0, x1])
                      + dy * ((1 - dx) * x[:, y1, x0] + dx * x[:, y1, x1]))
  return out


@pytest.mark.parametrize("method", ["nearest", "bilinear"])
@pytest.mark.parametrize("multiplier,n_stages", [(0.5, 2), (2.0, 1)])
def test_rescaler_matches_numpy(method, multiplier, n_stages):
  x = np.random.default_rng(2).standard_normal((2, 11, 8, 3)).astype(np.float32)
  module = SpatialRescaler(n_stages=n_stages, method=method, multiplier=multiplier, in_channels=3)
  expected = x.astype(np.float64)
  for _ in range(n_stages):
    expected = numpy_resize(expected, multiplier, method)
  out = module.apply({}, x)
  assert out.shape == expected.shape == ((2, 2, 2, 3) if multiplier == 0.5 else (2, 22, 16, 3))
  assert_close(out, expected, rel=1e-6)


@pytest.mark.parametrize("method", ["nearest", "bilinear", "bicubic", "area"])
def test_rescaler_matches_torch_interpolate(method):
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(3).standard_normal((2, 13, 9, 4)).astype(np.float32)
  module = SpatialRescaler(n_stages=2, method=method, multiplier=0.6, in_channels=4)
  ref = torch.tensor(x).permute(0, 3, 1, 2)
  for _ in range(2):
    ref = torch.nn.functional.interpolate(ref, scale_factor=0.6, mode=method)
  assert_close(module.apply({}, x), ref.permute(0, 2, 3, 1).numpy(), rel=1e-5)


def test_rescaler_channel_mapper_is_the_reference_1x1_conv():
  x = np.random.default_rng(4).standard_normal((2, 8, 8, 6)).astype(np.float32)
  module = SpatialRescaler(n_stages=1, method="bilinear", multiplier=0.5, in_channels=6, out_channels=3, bias=True)
  variables = random_variables(module, x)
  sd = naming.flax_to_torch(variables, add_prefix="cond_stage_model.")
  weight, bias = sd["cond_stage_model.channel_mapper.weight"], sd["cond_stage_model.channel_mapper.bias"]
  assert weight.shape == (3, 6, 1, 1)
  resized = numpy_resize(x.astype(np.float64), 0.5, "bilinear")
  expected = np.einsum("bhwi,oi->bhwo", resized, weight[:, :, 0, 0]) + bias
  assert_close(module.apply(variables, x), expected, rel=1e-5)


def test_rescaler_identity_and_bad_settings():
  x = np.random.default_rng(5).standard_normal((1, 4, 4, 2)).astype(np.float32)
  np.testing.assert_array_equal(SpatialRescaler(n_stages=0, in_channels=2).apply({}, x), x)
  with pytest.raises(ValueError, match="method must be one of"):
    SpatialRescaler(method="trilinear")
  with pytest.raises(ValueError, match="NHWC input with 3 channels"):
    SpatialRescaler(in_channels=3).apply({}, x)


# ----------------------------------------------------------------------------- layout tokens


def random_layouts(rng, batch, max_boxes):
  x0, y0 = rng.uniform(0, 0.9, (2, batch, max_boxes))
  w = rng.uniform(0, 1, (batch, max_boxes)) * (1 - x0)
  h = rng.uniform(0, 1, (batch, max_boxes)) * (1 - y0)
  return np.stack([x0, y0, w, h], -1), rng.integers(0, 601, (batch, max_boxes)), rng.integers(0, max_boxes + 1, batch)


def test_layout_tokens_follow_taming_formula():
  # grid 90: corner(x, y) = round(89 y) * 90 + round(89 x); 44.5 rounds to even.
  tokens = layout_to_tokens(
      [[[0.25, 0.5, 0.5, 0.25]]], [[7]], [1], num_classes=601, grid_size=90, max_objects=3, vocab_size=8192,
      crop_boxes_Bx4=[[0.0, 0.0, 1.0, 1.0]],
  )
  pad = 8191
  np.testing.assert_array_equal(tokens, [[7, 44 * 90 + 22, 67 * 90 + 67, pad, pad, pad, pad, pad, pad, 0, 8099]])
  assert layout_vocab_size(num_classes=601, grid_size=90) == 8101


def test_layout_tokens_round_trip_within_half_a_grid_cell():
  rng = np.random.default_rng(6)
  grid, max_objects = 90, 8
  boxes, labels, counts = random_layouts(rng, batch=16, max_boxes=max_objects)
  crops = np.tile([0.1, 0.2, 0.7, 0.6], (16, 1))
  tokens = layout_to_tokens(
      boxes, labels, counts, num_classes=601, grid_size=grid, max_objects=max_objects, vocab_size=8192,
      crop_boxes_Bx4=crops,
  )
  assert tokens.shape == (16, 3 * max_objects + 2) and tokens.dtype == np.int32
  assert tokens.min() >= 0 and tokens.max() == 8191
  got_boxes, got_labels, got_counts, got_crops = tokens_to_layout(
      tokens, grid_size=grid, max_objects=max_objects, vocab_size=8192, has_crop=True
  )
  np.testing.assert_array_equal(got_counts, counts)
  cell = 1 / (grid - 1)
  for i, n in enumerate(counts):
    np.testing.assert_array_equal(got_labels[i, :n], labels[i, :n])
    assert np.all(got_labels[i, n:] == -1)
    corners = lambda b: np.concatenate([b[..., :2], b[..., :2] + b[..., 2:]], -1)  # noqa: E731
    assert np.max(np.abs(corners(got_boxes[i, :n]) - corners(boxes[i, :n])), initial=0) <= cell / 2 + 1e-9
  assert np.max(np.abs(corners(got_crops) - corners(crops))) <= cell / 2 + 1e-9


def test_layout_tokens_reject_bad_layouts():
  kwargs = dict(num_classes=10, grid_size=4, max_objects=2)
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
    layout_to_tokens([[[0, 0, 0.5, 0.5]]], [[10]], [1], **kwargs)
  with pytest.raises(ValueError, match="inside the unit square"):
    layout_to_tokens([[[0.6, 0, 0.5, 0.5]]], [[1]], [1], **kwargs)
  with pytest.raises(ValueError, match="num_objects must lie in"):
    layout_to_tokens([[[0, 0, 0.5, 0.5]] * 3], [[1, 2, 3]], [3], **kwargs)
  with pytest.raises(ValueError, match="need at least 17"):
    layout_to_tokens([[[0, 0, 0.5, 0.5]]], [[1]], [1], vocab_size=16, **kwargs)


def test_layout_encoder_defaults_are_layout2img_openimages256():
  encoder = LayoutEncoder()
  assert (encoder.n_embed, encoder.n_layer, encoder.vocab_size, encoder.max_seq_len) == (512, 16, 8192, 92)
  assert encoder.layout_grid_size == 90  # taming: int(sqrt(8192))
  empty = encoder.empty_layout_tokens(2)
  np.testing.assert_array_equal(empty, np.tile([8191] * 90 + [0, 8099], (2, 1)))


def test_layout_encoder_reads_the_layout():
  encoder = LayoutEncoder(n_embed=32, n_layer=1, heads=2, dim_head=8, max_seq_len=14, max_objects=4)
  boxes, labels, counts = random_layouts(np.random.default_rng(7), batch=2, max_boxes=4)
  counts[:] = 3
  tokens = encoder.tokenize(boxes, labels, counts)
  assert tokens.shape == (2, 14)
  moved = boxes.copy()
  moved[:, 0, :2] = moved[:, 0, :2] * 0.5
  tokens_moved = encoder.tokenize(moved, labels, counts)
  variables = random_variables(encoder, tokens)
  run = jax.jit(encoder.apply)
  out, out_moved = run(variables, tokens), run(variables, tokens_moved)
  assert out.shape == (2, 14, 32)
  assert np.max(np.abs(np.asarray(out) - np.asarray(out_moved))) > 1e-3
  with pytest.raises(ValueError, match="exceed max_seq_len 13"):
    LayoutEncoder(n_embed=32, n_layer=1, max_seq_len=13, max_objects=4).tokenize(boxes, labels, counts)


def test_dataset_boxes_become_layout_boxes():
  """The pipeline's (ymin, xmin, ymax, xmax) boxes to the encoder's (x0, y0, w, h)."""
  from ldm_jax.models.latent_diffusion import corners_to_xywh

  corners = np.array([[[0.5625, 0.6875, 0.75, 0.875], [0.0, 0.0, 0.0, 0.0]]], np.float32)
  np.testing.assert_allclose(corners_to_xywh(corners), [[[0.6875, 0.5625, 0.1875, 0.1875], [0, 0, 0, 0]]])
