"""Published checkpoints converted to our orbax format (``ldm_jax.interop.orbax_format``):
``load_pipeline`` on the converted folder gives back exactly the model, weights,
schedule and sampler settings of loading the original, from a tiny random
diffusers folder the test writes (SD v2-like: v-prediction, linear projections)."""

import json

import jax
import numpy as np
import pytest
from flax import traverse_util
from sd_reference import SD_V2_LIKE, make_sd_folder

from ldm_jax.interop import orbax_format
from ldm_jax.interop.load import load_pipeline
from ldm_jax.interop.pretrained import load_pretrained_pipeline


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp("sd_v2")
  make_sd_folder(root, SD_V2_LIKE, seed=21)
  orbax_format.main([str(root / "sd"), str(root / "orbax")])  # the command line
  return root / "sd", str(root / "orbax")


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree))


def test_round_trip_is_exact(converted):
  source, out = converted
  want, got = load_pretrained_pipeline(str(source)), load_pipeline(out)
  for part in ("unet", "first_stage", "scale_factor", "concat_kind"):
    assert getattr(got.model, part) == getattr(want.model, part), part
  assert got.model.cond_stage.module == want.model.cond_stage.module
  for a, b in ((got.params, want.params), (got.frozen, want.frozen)):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys() and len(fa) > 20
    for k in fb:
      assert fa[k].dtype == fb[k].dtype == np.float32
      np.testing.assert_array_equal(fa[k], fb[k], err_msg="/".join(k))
  assert (got.prediction_type, got.image_size, got.max_length) == ("v", want.image_size, want.max_length)
  assert got.sampler_defaults == want.sampler_defaults
  np.testing.assert_array_equal(got.schedule.alphas_cumprod, want.schedule.alphas_cumprod)
  assert got.tokenizer("a red cat")["input_ids"] == want.tokenizer("a red cat")["input_ids"]


def test_refuses_to_overwrite_and_names_a_wrong_version(converted, tmp_path):
  source, out = converted
  with pytest.raises(FileExistsError, match="not empty"):
    orbax_format.convert(str(source), out)
  with open(f"{out}/{orbax_format.DESCRIPTION_FILE}") as f:
    saved = json.load(f)
  saved["version"] = 99
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / orbax_format.DESCRIPTION_FILE).write_text(json.dumps(saved))
  with pytest.raises(ValueError, match="version 1 .*version 99"):
    load_pipeline(str(bad))
