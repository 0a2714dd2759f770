"""The networks whose features the generative metrics compare, by name.

- ``inception``: the FID Inception-v3 with published weights (``--inception_weights``).
- ``shapes_judge``: the captioned-shapes judge (``shapes_judge.py``) from a
  weights file; FID-like numbers for the demo world, not comparable to FID.
- ``random_inception``: a narrow Inception with random weights, for tests
  only: its numbers mean nothing.

Every network maps a batch of images (uint8 or [-1, 1] floats, NHWC) to
``{"pool": (B, D) features[, "logits": (B, C)]}``, runs sharded over a mesh,
and carries a description of its weights (file and SHA-256) for reports.
"""

import dataclasses
import hashlib
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.evaluation import inception as inc
from ldm_jax.evaluation.features import ShardedFeatureExtractor
from ldm_jax.interop import weights

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


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


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


def random_inception_variables(model: inc.InceptionV3, seed: int = 0) -> dict:
  """He-scaled random weights, identity batch norms: activations stay O(1)."""
  shapes = inc._variables_template(model)
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
  from ldm_jax.evaluation.shapes_judge import ShapesJudge

  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(ShapesJudge().init, jax.random.key(0), x)


def save_judge(path: str, params: Any) -> None:
  """Writes a (trained) shapes judge's variables for ``--judge_weights``."""
  weights.save_variables(path, params)


def make_feature_net(
    name: str, *, inception_weights: str = "", judge_weights: str = "", flag_prefix: str = "--"
) -> FeatureNet:
  """The named feature network; weights come from files (nothing is downloaded).

  ``flag_prefix`` names the option in error messages (``--`` for the command,
  ``config.eval.`` for training).
  """
  if name == "inception":
    convert = "python -m ldm_jax.evaluation.inception --convert pt_inception-2015-12-05-6726825d.pth --out"
    if not inception_weights:
      raise ValueError(
          f"feature net 'inception' needs its weights: pass {flag_prefix}inception_weights=fid_inception.npz. "
          f"Download {inc.FID_WEIGHTS_URL} and convert it with `{convert} fid_inception.npz`"
      )
    if not os.path.isfile(inception_weights):
      raise FileNotFoundError(
          f"{flag_prefix}inception_weights file not found: {inception_weights}. Download {inc.FID_WEIGHTS_URL} "
          f"and convert it with `{convert} {inception_weights}`"
      )
    model = inc.InceptionV3()
    variables = inc.load_inception_params(inception_weights, model)
    return FeatureNet(name, _inception_fn(model), variables, os.path.abspath(inception_weights),
                      file_sha256(inception_weights), True)
  if name == "shapes_judge":
    from ldm_jax.evaluation.shapes_judge import ShapesJudge

    if not judge_weights or not os.path.isfile(judge_weights):
      raise FileNotFoundError(
          f"feature net 'shapes_judge' needs {flag_prefix}judge_weights (got {judge_weights!r}): train one with "
          "ldm_jax.evaluation.shapes_judge.train_judge and save its params with feature_nets.save_judge"
      )
    variables = weights.load_variables(judge_weights, what="shapes judge weights")
    weights.check_variables(variables, judge_template(), what=f"shapes judge file {judge_weights}")
    return FeatureNet(name, _judge_fn(ShapesJudge()), variables, os.path.abspath(judge_weights),
                      file_sha256(judge_weights), False)
  if name == "random_inception":
    model = inc.InceptionV3(width_multiplier=RANDOM_INCEPTION_WIDTH)
    return FeatureNet(name, _inception_fn(model), random_inception_variables(model), None, None, True)
  raise ValueError(f"unknown feature net {name!r}; choose from {FEATURE_NETS}")
