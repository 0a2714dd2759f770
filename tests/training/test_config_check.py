"""Bad training settings fail at once with one line naming the key (issue: reliability)."""

import os
import subprocess
import sys

import pytest

from ldm_jax.config import ConfigError, load_config
from ldm_jax.training.config_check import check_training_config

LDM = "configs/ldm.py:shapes_txt2img,tiny"
AE = "configs/autoencoder.py:kl_f4,tiny"


@pytest.mark.parametrize("spec, key, value, message", [
    (LDM, "train.checkpoint_every", 0, r"config.train.checkpoint_every=0 is invalid: expected an integer >= 1"),
    (LDM, "train.log_every", 0, r"config.train.log_every=0 is invalid: expected an integer >= 1"),
    (LDM, "train.num_steps", -5, r"config.train.num_steps=-5 is invalid: expected an integer >= 1"),
    (LDM, "optim.learning_rate", -1e-4, r"config.optim.learning_rate=-0.0001 is invalid: expected a finite number > 0"),
    (LDM, "optim.learning_rate", float("nan"), r"config.optim.learning_rate=nan is invalid"),
    (LDM, "seed", -1, r"config.seed=-1 is invalid: expected an integer >= 0"),
    (LDM, "data.source", "lmdb", r"config.data.source='lmdb' is invalid: expected one of \('shapes'"),
    (LDM, "diffusion.prediction_type", "bogus", r"config.diffusion: unknown prediction_type 'bogus'"),
    (LDM, "diffusion.loss_type", "huber", r"config.diffusion.loss_type='huber' is invalid: expected one of"),
    (LDM, "mesh.shape", (3, 1, 1), r"config.mesh.shape: .*needs 3 devices but 8 are available"),
    (LDM, "train.batch_size", 6, r"config.train.batch_size=6 is invalid: expected a multiple of the data-parallel "
                                 r"size 8 \(mesh data=8 x fsdp=1\)"),
    (AE, "train.keep_checkpoints", 0, r"config.train.keep_checkpoints=0 is invalid"),
])
def test_a_bad_setting_names_its_key(spec, key, value, message):
  config = load_config(spec)
  section, _, name = key.rpartition(".")
  (config[section] if section else config)[name] = value  # nested sections are one level deep here
  with pytest.raises(ConfigError, match=message):
    check_training_config(config, num_devices=8)


def test_missing_paths_are_named(tmp_path):
  config = load_config(LDM)
  config.first_stage.update(checkpoint=str(tmp_path / "no_stage1"), random_init=False)
  with pytest.raises(ConfigError, match="config.first_stage.checkpoint='.*no_stage1' is invalid: expected an existing"):
    check_training_config(config, num_devices=8)
  config.first_stage.update(checkpoint="", random_init=False)
  with pytest.raises(ConfigError, match="first_stage.checkpoint='' is invalid: expected a stage-1 run directory"):
    check_training_config(config, num_devices=8)
  config = load_config(LDM)
  config.data.update(source="folder", path=str(tmp_path / "no_images"))
  with pytest.raises(ConfigError, match="config.data.path='.*no_images' is invalid: expected an existing path"):
    check_training_config(config, num_devices=8)


@pytest.mark.parametrize("spec", [LDM, AE, "configs/ldm.py:shapes_class,tiny", "configs/autoencoder.py:demo,tiny"])
def test_the_shipped_configs_pass(spec):
  check_training_config(load_config(spec), num_devices=8)


def test_train_py_answers_in_one_line_before_loading_anything(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = subprocess.run(
      [sys.executable, "train.py", "--config", LDM, "--config.train.checkpoint_every=0",
       "--workdir", str(tmp_path / "run")],
      capture_output=True, text=True, timeout=300, cwd=root, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 1, out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1] == (
      "error: config.train.checkpoint_every=0 is invalid: expected an integer >= 1"), out.stderr[-2000:]
  assert "Traceback" not in out.stderr and not os.path.exists(tmp_path / "run" / "checkpoints")
