"""A stage-2 run's copy of its first stage tells when it is asked to resume on another one."""

import numpy as np

from ldm_jax.training.first_stage_copy import copy_differs, save_first_stage_copy


def test_copy_differs_names_what_changed(tmp_path):
  rng = np.random.default_rng(0)
  variables = {"params": {"conv": {"kernel": rng.normal(size=(3, 3, 4, 8)).astype(np.float32),
                                   "bias": rng.normal(size=(8,)).astype(np.float32)}}}
  config = {"kind": "kl", "embed_dim": 4, "ddconfig": {"ch_mult": (1, 2)}}
  directory = str(tmp_path / "first_stage")
  assert copy_differs(directory, variables, config, 0.18) is None  # no copy yet
  save_first_stage_copy(directory, variables, config, 0.18)
  assert copy_differs(directory, variables, config, 0.18) is None  # tuples vs the JSON's lists do not count
  assert copy_differs(directory, variables, {**config, "embed_dim": 3}, 0.18) == "model config"
  assert copy_differs(directory, variables, config, 0.2).startswith("scale factor (0.18 saved, 0.2 now)")
  changed = {"params": {"conv": {**variables["params"]["conv"], "bias": variables["params"]["conv"]["bias"] + 1e-6}}}
  assert copy_differs(directory, changed, config, 0.18) == "weights"
