"""The networks whose features the generative metrics compare, by name.

- ``inception``: the FID Inception-v3 with published weights (``--inception_weights``).
- ``shapes_judge``: the captioned-shapes judge (``shapes_judge.py``) from a
  weights file; FID-like numbers for the demo world, not comparable to FID.
- ``random_inception``: a narrow Inception with random weights, for tests
  only: its numbers mean nothing.

Every network maps a batch of images (uint8 or [-1, 1] floats, NHWC) to
``{"pool": (B, D) features[, "logits": (B, C)]}``, runs sharded over a mesh,
and carries a description of its weights (file and SHA-256) for reports.
``ldm_jax.interop.feature_nets.make_feature_net`` builds one from its weights file.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.evaluation import inception as inc
from ldm_jax.evaluation.features import ShardedFeatureExtractor
from ldm_jax.evaluation.shapes_judge import ShapesJudge

FEATURE_NETS = ("inception", "shapes_judge", "random_inception")
RANDOM_INCEPTION_WIDTH = 1 / 16


@dataclasses.dataclass
class FeatureNet:
  name: str
  fn: Callable[[Any, jax.Array], dict]
  variables: Any
  weights_file: str | None
  weights_sha256: str | None
  has_logits: bool

  def extractor(self, mesh=None) -> ShardedFeatureExtractor:
    return ShardedFeatureExtractor(self.fn, self.variables, mesh)

  def describe(self) -> dict:
    return {"name": self.name, "weights_file": self.weights_file, "weights_sha256": self.weights_sha256}


def _to_signed_unit(images: jax.Array) -> jax.Array:
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 127.5 - 1.0
  return images.astype(jnp.float32)


def _inception_fn(model: inc.InceptionV3):
  def fn(variables, images):
    out = model.apply(variables, images)
    # IS uses the logits without the fc bias, as the original IS code does.
    return {"pool": out["pool"], "logits": out["logits_unbiased"]}

  return fn


def _judge_fn(model):
  def fn(variables, images):
    _, _, features = model.apply(variables, _to_signed_unit(images))
    return {"pool": features}

  return fn


def inception_net(variables: Any, weights_file: str | None = None, weights_sha256: str | None = None) -> FeatureNet:
  """The ``inception`` feature net with its (published, converted) variables."""
  return FeatureNet("inception", _inception_fn(inc.InceptionV3()), variables, weights_file, weights_sha256, True)


def judge_net(variables: Any, weights_file: str | None = None, weights_sha256: str | None = None) -> FeatureNet:
  """The ``shapes_judge`` feature net with its (trained) variables."""
  return FeatureNet("shapes_judge", _judge_fn(ShapesJudge()), variables, weights_file, weights_sha256, False)


def random_inception_net(seed: int = 0) -> FeatureNet:
  """The ``random_inception`` feature net (tests only)."""
  model = inc.InceptionV3(width_multiplier=RANDOM_INCEPTION_WIDTH)
  return FeatureNet("random_inception", _inception_fn(model), random_inception_variables(model, seed), None, None,
                    True)


def random_inception_variables(model: inc.InceptionV3, seed: int = 0) -> dict:
  """He-scaled random weights, identity batch norms: activations stay O(1)."""
  shapes = inc.variables_template(model)
  rng = np.random.default_rng(seed)

  def init(path, s):
    name = path[-1].key
    if name == "kernel":
      return (rng.normal(size=s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1]))).astype(np.float32)
    if name in ("scale", "var"):
      return np.ones(s.shape, np.float32)
    return np.zeros(s.shape, np.float32)  # biases, batch-norm shifts and means

  return jax.tree_util.tree_map_with_path(init, shapes)


def judge_template(image_size: int = 64) -> dict:
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(ShapesJudge().init, jax.random.key(0), x)
