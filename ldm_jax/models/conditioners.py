"""The small conditioning encoders: class labels, spatial maps, object layouts.

- ``ClassEmbedder``: a label -> one context token, with a null class for
  classifier-free guidance (``drop_labels_to_null`` for training).
- ``SpatialRescaler``: resizes a map ``n_stages`` times like
  ``torch.nn.functional.interpolate(scale_factor=multiplier)``, then an
  optional 1x1 ``channel_mapper`` (semantic maps, super-resolution inputs).
- ``layout_to_tokens`` / ``tokens_to_layout`` and ``LayoutEncoder``: taming
  transformers' bounding-box token layout, read by an LDM-BERT.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models.ldm_bert import LDMBert


class ClassEmbedder(nn.Module):
  """Class label (B,) -> context (B, 1, embed_dim); params ``embedding`` as the reference.

  With classifier-free guidance the last index is the null class (ImageNet
  cin256: ``n_classes=1001``, null 1000), as in the reference's
  ``ClassEmbedder.get_unconditional_conditioning``.
  """

  embed_dim: int
  n_classes: int = 1000
  key: str = "class"  # The batch entry holding the labels (for the data pipeline).
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def null_class(self) -> int:
    return self.n_classes - 1

  @nn.compact
  def __call__(self, labels_B: jax.Array) -> jax.Array:
    labels_B = jnp.asarray(labels_B)
    if labels_B.ndim != 1 or not jnp.issubdtype(labels_B.dtype, jnp.integer):
      raise ValueError(f"ClassEmbedder takes integer labels of shape (batch,), got {labels_B.dtype} {labels_B.shape}")
    embed = nn.Embed(self.n_classes, self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="embedding")
    return embed(labels_B[:, None])


def drop_labels_to_null(rng: jax.Array, labels_B: jax.Array, p: float, null_class: int) -> jax.Array:
  """Replaces each label by ``null_class`` with probability ``p`` (classifier-free guidance training)."""
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"drop probability must lie in [0, 1], got {p}")
  drop = jax.random.bernoulli(rng, p, jnp.shape(labels_B))
  return jnp.where(drop, jnp.asarray(null_class, jnp.asarray(labels_B).dtype), labels_B)


# ----------------------------------------------------------------------------- spatial rescaler

RESIZE_METHODS = ("nearest", "bilinear", "bicubic", "area")


def _cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """PyTorch's cubic convolution kernel (A = -0.75)."""
  t = np.abs(t)
  near = ((a + 2) * t - (a + 3)) * t * t + 1
  far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
  return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def resize_matrix(in_size: int, out_size: int, multiplier: float, method: str) -> np.ndarray:
  """(out_size, in_size) float64 weights of one axis of ``F.interpolate(scale_factor=multiplier)``.

  PyTorch (``align_corners=False``, no antialias) maps output pixel ``i`` to
  input coordinate ``(i + 0.5) / multiplier - 0.5`` using the given factor,
  not ``in/out``; ``area`` is adaptive average pooling to ``out_size``.
  """
  weights = np.zeros((out_size, in_size))
  rows = np.arange(out_size)
  if method == "nearest":
    src = np.minimum(np.floor(rows / multiplier).astype(int), in_size - 1)
    weights[rows, src] = 1.0
  elif method == "bilinear":
    src = np.maximum((rows + 0.5) / multiplier - 0.5, 0.0)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    np.add.at(weights, (rows, lo), 1.0 - frac)
    np.add.at(weights, (rows, hi), frac)
  elif method == "bicubic":
    src = (rows + 0.5) / multiplier - 0.5
    base = np.floor(src).astype(int)
    for offset in (-1, 0, 1, 2):
      tap = base + offset
      np.add.at(weights, (rows, np.clip(tap, 0, in_size - 1)), _cubic(src - tap))
  elif method == "area":
    for i in rows:
      start, end = (i * in_size) // out_size, -((-(i + 1) * in_size) // out_size)
      weights[i, start:end] = 1.0 / (end - start)
  else:
    raise ValueError(f"resize method must be one of {RESIZE_METHODS}, got {method!r}")
  return weights


def _resize_axis(x: jax.Array, axis: int, multiplier: float, method: str) -> jax.Array:
  in_size = x.shape[axis]
  out_size = math.floor(in_size * multiplier)  # PyTorch's output size for a scale factor
  if out_size < 1:
    raise ValueError(f"resizing {in_size} pixels by {multiplier} leaves none")
  if method == "nearest":  # a gather keeps label maps exact
    src = np.minimum(np.floor(np.arange(out_size) / multiplier).astype(int), in_size - 1)
    return jnp.take(x, src, axis=axis)
  weights = jnp.asarray(resize_matrix(in_size, out_size, multiplier, method), jnp.float32)
  out = jnp.tensordot(weights, x.astype(jnp.float32), axes=((1,), (axis,)), precision=jax.lax.Precision.HIGHEST)
  return jnp.moveaxis(out, 0, axis).astype(x.dtype)


class SpatialRescaler(nn.Module):
  """Resizes NHWC maps ``n_stages`` times by ``multiplier``, then maps channels 1x1.

  As the reference: ``n_stages=0`` and no ``out_channels`` is the identity.
  The reference also lists 'linear' and 'trilinear', which PyTorch rejects for
  images; they are refused here up front.
  """

  n_stages: int = 1
  method: str = "bilinear"
  multiplier: float = 0.5
  in_channels: int = 3
  out_channels: int | None = None
  bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    if self.n_stages < 0:
      raise ValueError(f"n_stages must be >= 0, got {self.n_stages}")
    if self.method not in RESIZE_METHODS:
      raise ValueError(f"SpatialRescaler method must be one of {RESIZE_METHODS} for images, got {self.method!r}")
    if self.multiplier <= 0:
      raise ValueError(f"multiplier must be positive, got {self.multiplier}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    if x_BxHxWxC.ndim != 4 or x_BxHxWxC.shape[-1] != self.in_channels:
      raise ValueError(f"SpatialRescaler expects NHWC input with {self.in_channels} channels, got {x_BxHxWxC.shape}")
    x = x_BxHxWxC
    for _ in range(self.n_stages):
      x = _resize_axis(_resize_axis(x, 1, self.multiplier, self.method), 2, self.multiplier, self.method)
    if self.out_channels is not None:
      x = nn.Conv(
          self.out_channels, (1, 1), use_bias=self.bias, dtype=self.dtype, param_dtype=self.param_dtype,
          name="channel_mapper",
      )(x)
    return x


# ----------------------------------------------------------------------------- layouts

def layout_vocab_size(num_classes: int, grid_size: int) -> int:
  """Smallest vocabulary for the layout tokens: classes and grid cells share ids, plus the pad."""
  return max(num_classes, grid_size * grid_size) + 1


def _coordinate_tokens(x: np.ndarray, y: np.ndarray, grid_size: int) -> np.ndarray:
  # taming rounds with Python's round(): half to even, as np.rint.
  return (np.rint(y * (grid_size - 1)) * grid_size + np.rint(x * (grid_size - 1))).astype(np.int32)


def layout_to_tokens(
    boxes_BxOx4: Any,
    labels_BxO: Any,
    num_objects_B: Any,
    *,
    num_classes: int,
    grid_size: int,
    max_objects: int,
    vocab_size: int | None = None,
    crop_boxes_Bx4: Any | None = None,
) -> np.ndarray:
  """Object layouts -> int32 tokens, as taming's ``ObjectsBoundingBoxConditionalBuilder``.

  Boxes are ``(x0, y0, w, h)`` in [0, 1] image fractions. Each of the first
  ``num_objects`` objects becomes ``[label, corner(x0, y0), corner(x0+w, y0+h)]``
  where ``corner(x, y) = round(y (g-1)) g + round(x (g-1))`` on a ``g = grid_size``
  grid; the rest, up to ``max_objects``, are ``[pad, pad, pad]`` with
  ``pad = vocab_size - 1``. With ``crop_boxes_Bx4`` two corner tokens of the
  crop follow. Length ``3 max_objects (+ 2)``. Labels and corners share ids, so
  ``vocab_size`` defaults to ``layout_vocab_size(num_classes, grid_size)``.
  layout2img-openimages256 uses ``vocab_size=8192, grid_size=90`` (taming's
  ``int(sqrt(no_tokens))``), ``max_objects=30`` and the crop: 92 tokens.
  """
  vocab_size = layout_vocab_size(num_classes, grid_size) if vocab_size is None else vocab_size
  pad = vocab_size - 1
  if grid_size < 2 or grid_size * grid_size > pad or num_classes > pad:
    raise ValueError(
        f"vocab_size {vocab_size} cannot hold {num_classes} classes and a {grid_size}x{grid_size} grid "
        f"below the pad token; need at least {layout_vocab_size(num_classes, grid_size)} (and grid_size >= 2)"
    )
  boxes, labels = np.asarray(boxes_BxOx4, np.float64), np.asarray(labels_BxO)
  num_objects = np.asarray(num_objects_B)
  b = labels.shape[0]
  if boxes.shape[:2] != labels.shape or boxes.shape[2:] != (4,) or num_objects.shape != (b,):
    raise ValueError(
        f"expected boxes (B, O, 4), labels (B, O) and num_objects (B,); got {boxes.shape}, {labels.shape}, "
        f"{num_objects.shape}"
    )
  if np.any(num_objects < 0) or np.any(num_objects > min(max_objects, labels.shape[1])):
    raise ValueError(
        f"num_objects must lie in [0, min(max_objects={max_objects}, O={labels.shape[1]})], got {num_objects}"
    )
  tokens = np.full((b, max_objects, 3), pad, np.int32)
  for i in range(b):
    n = int(num_objects[i])
    if n == 0:
      continue
    _check_boxes(boxes[i, :n], "boxes")
    if np.any(labels[i, :n] < 0) or np.any(labels[i, :n] >= num_classes):
      raise ValueError(f"labels must lie in [0, {num_classes}), got {labels[i, :n]}")
    tokens[i, :n] = _object_tokens(boxes[i, :n], labels[i, :n], grid_size)
  tokens = tokens.reshape(b, 3 * max_objects)
  if crop_boxes_Bx4 is None:
    return tokens
  crops = np.asarray(crop_boxes_Bx4, np.float64)
  if crops.shape != (b, 4):
    raise ValueError(f"crop_boxes must have shape ({b}, 4), got {crops.shape}")
  _check_boxes(crops, "crop_boxes")
  return np.concatenate([tokens, _object_tokens(crops, None, grid_size)], axis=1)


def _check_boxes(boxes_Nx4: np.ndarray, what: str, tol: float = 1e-6) -> None:
  x0, y0, w, h = boxes_Nx4.T
  if np.any(np.minimum(x0, y0) < -tol) or np.any(np.minimum(w, h) < -tol) or np.any(
      np.maximum(x0 + w, y0 + h) > 1 + tol
  ):
    raise ValueError(f"{what} must be (x0, y0, w, h) inside the unit square, got {boxes_Nx4.tolist()}")


def _object_tokens(boxes_Nx4: np.ndarray, labels_N: np.ndarray | None, grid_size: int) -> np.ndarray:
  x0, y0, w, h = np.clip(boxes_Nx4, 0.0, 1.0).T  # within the checks' tolerance
  corners = [
      _coordinate_tokens(x0, y0, grid_size),
      _coordinate_tokens(np.minimum(x0 + w, 1), np.minimum(y0 + h, 1), grid_size),
  ]
  columns = corners if labels_N is None else [np.asarray(labels_N, np.int32), *corners]
  return np.stack(columns, axis=-1)


def tokens_to_layout(
    tokens_BxL: Any, *, grid_size: int, max_objects: int, vocab_size: int, has_crop: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
  """Inverse of :func:`layout_to_tokens`, up to the grid quantisation.

  Returns ``(boxes (B, max_objects, 4), labels (B, max_objects), num_objects (B,),
  crop_boxes (B, 4) or None)``; padded objects have label -1 and zero boxes.
  """
  tokens = np.asarray(tokens_BxL)
  expected = 3 * max_objects + 2 * has_crop
  if tokens.ndim != 2 or tokens.shape[1] != expected:
    raise ValueError(f"expected layout tokens of shape (B, {expected}), got {tokens.shape}")

  def corners_to_boxes(first, second):
    x0, y0 = first % grid_size, first // grid_size
    x1, y1 = second % grid_size, second // grid_size
    return np.stack([x0, y0, x1 - x0, y1 - y0], axis=-1) / (grid_size - 1)

  triples = tokens[:, : 3 * max_objects].reshape(-1, max_objects, 3)
  present = triples[..., 0] != vocab_size - 1
  boxes = np.where(present[..., None], corners_to_boxes(triples[..., 1], triples[..., 2]), 0.0)
  labels = np.where(present, triples[..., 0], -1)
  crops = corners_to_boxes(tokens[:, -2], tokens[:, -1]) if has_crop else None
  return boxes, labels, present.sum(axis=1), crops


class LayoutEncoder(LDMBert):
  """LDM-BERT over layout tokens; defaults and token layout of layout2img-openimages256.

  The reference is ``BERTEmbedder(n_embed=512, n_layer=16, vocab_size=8192,
  max_seq_len=92, use_tokenizer=False)`` over 30 OpenImages objects (601
  classes) plus the crop. ``tokenize`` builds that module's input.
  """

  n_embed: int = 512
  n_layer: int = 16
  vocab_size: int = 8192
  max_seq_len: int = 92
  num_classes: int = 601
  grid_size: int | None = None  # None: taming's int(sqrt(vocab_size)).
  max_objects: int = 30
  encode_crop: bool = True

  @property
  def layout_grid_size(self) -> int:
    return self.grid_size if self.grid_size is not None else math.isqrt(self.vocab_size)

  def tokenize(self, boxes_BxOx4, labels_BxO, num_objects_B, crop_boxes_Bx4=None) -> np.ndarray:
    """Layouts -> this encoder's tokens; the crop defaults to the full image when encoded."""
    if self.encode_crop and crop_boxes_Bx4 is None:
      crop_boxes_Bx4 = np.tile([0.0, 0.0, 1.0, 1.0], (np.shape(labels_BxO)[0], 1))
    tokens = layout_to_tokens(
        boxes_BxOx4, labels_BxO, num_objects_B, num_classes=self.num_classes, grid_size=self.layout_grid_size,
        max_objects=self.max_objects, vocab_size=self.vocab_size,
        crop_boxes_Bx4=crop_boxes_Bx4 if self.encode_crop else None,
    )
    if tokens.shape[1] > self.max_seq_len:
      raise ValueError(f"{tokens.shape[1]} layout tokens exceed max_seq_len {self.max_seq_len}")
    return tokens

  def empty_layout_tokens(self, batch_size: int) -> np.ndarray:
    """Tokens of a layout without objects (the unconditional input)."""
    return self.tokenize(np.zeros((batch_size, 0, 4)), np.zeros((batch_size, 0), np.int32), np.zeros(batch_size, int))
