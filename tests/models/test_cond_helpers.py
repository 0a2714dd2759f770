"""Helpers shared by the conditioning-encoder tests (and a check that they can fail).

Parameters are drawn with NumPy on a ``jax.eval_shape`` template: initialising
a module eagerly or under jit costs seconds on a 2-core CPU.
"""

from typing import Any

import jax
import numpy as np
import pytest
from flax import traverse_util


def assert_close(ours: Any, reference: Any, rel: float = 1e-4) -> None:
  """max |ours - reference| <= rel * max |reference| (shapes equal)."""
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  assert ours.shape == reference.shape, f"shape {ours.shape} != reference {reference.shape}"
  err, scale = np.max(np.abs(ours - reference)), np.max(np.abs(reference))
  assert err <= rel * scale, f"max error {err:.3g} > {rel} x {scale:.3g}"


def random_variables(module, *args: Any, seed: int = 0, std: float = 0.3) -> dict[str, Any]:
  """Random float32 variables for ``module.init(key, *args)``; norm scales around 1."""
  template = jax.eval_shape(module.init, jax.random.key(0), *args)
  rng = np.random.default_rng(seed)
  flat = {
      path: ((path[-1] == "scale") + std * rng.standard_normal(leaf.shape)).astype(np.float32)
      for path, leaf in traverse_util.flatten_dict(template).items()
  }
  return traverse_util.unflatten_dict(flat)


def test_assert_close_notices_errors_relative_to_scale():
  reference = np.array([100.0, -50.0, 3.0])
  assert_close(reference + 5e-3, reference)  # 5e-3 <= 1e-4 * 100
  with pytest.raises(AssertionError, match="max error"):
    assert_close(reference + 2e-2, reference)
  with pytest.raises(AssertionError, match="shape"):
    assert_close(reference[:2], reference)
