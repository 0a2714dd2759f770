"""Feature networks (``ldm_jax.evaluation.feature_nets``) from their weights files, and the files' hashes."""

import hashlib
import os
from typing import Any

from ldm_jax.evaluation.feature_nets import (
  FEATURE_NETS,
  FeatureNet,
  inception_net,
  judge_net,
  judge_template,
  random_inception_net,
)
from ldm_jax.interop import weights
from ldm_jax.interop.inception import CONVERT_COMMAND, FID_WEIGHTS_URL, load_inception_params


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


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
    if not inception_weights:
      raise ValueError(
          f"feature net 'inception' needs its weights: pass {flag_prefix}inception_weights=fid_inception.npz. "
          f"Download {FID_WEIGHTS_URL} and convert it with `{CONVERT_COMMAND} fid_inception.npz`"
      )
    if not os.path.isfile(inception_weights):
      raise FileNotFoundError(
          f"{flag_prefix}inception_weights file not found: {inception_weights}. Download {FID_WEIGHTS_URL} "
          f"and convert it with `{CONVERT_COMMAND} {inception_weights}`"
      )
    variables = load_inception_params(inception_weights)
    return inception_net(variables, os.path.abspath(inception_weights), file_sha256(inception_weights))
  if name == "shapes_judge":
    if not judge_weights or not os.path.isfile(judge_weights):
      raise FileNotFoundError(
          f"feature net 'shapes_judge' needs {flag_prefix}judge_weights (got {judge_weights!r}): train one with "
          "ldm_jax.evaluation.shapes_judge.train_judge and save its params with "
          "ldm_jax.interop.feature_nets.save_judge"
      )
    variables = weights.load_variables(judge_weights, what="shapes judge weights")
    weights.check_variables(variables, judge_template(), what=f"shapes judge file {judge_weights}")
    return judge_net(variables, os.path.abspath(judge_weights), file_sha256(judge_weights))
  if name == "random_inception":
    return random_inception_net()
  raise ValueError(f"unknown feature net {name!r}; choose from {FEATURE_NETS}")
