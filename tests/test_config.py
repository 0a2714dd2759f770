"""Config loading, variant words and override-key errors."""

import json
import subprocess
import sys
import textwrap

import pytest

from ldm_jax import config as config_lib

_CONFIG = textwrap.dedent(
    """
    import ml_collections
    from ldm_jax.config import parse_variants

    def get_config(arg=None):
      words = parse_variants(arg, ["kl_f8", "tiny"])
      c = ml_collections.ConfigDict()
      c.model = ml_collections.ConfigDict(dict(ch=128, ch_mult=(1, 2, 4, 4), z_channels=4))
      c.optim = ml_collections.ConfigDict(dict(learning_rate=4.5e-6))
      if "tiny" in words:
        c.model.ch = 32
      return c
    """
)


@pytest.fixture()
def config_file(tmp_path):
  path = tmp_path / "exp.py"
  path.write_text(_CONFIG)
  return str(path)


def test_variants_and_unknown_variant(config_file):
  assert config_lib.load_config(config_file + ":kl_f8,tiny").model.ch == 32
  with pytest.raises(config_lib.ConfigError, match=r"unknown config variant 'tinny'.*Did you mean tiny"):
    config_lib.load_config(config_file + ":tinny")


def test_unknown_override_lists_keys_near_it(config_file):
  cfg = config_lib.load_config(config_file)
  config_lib.check_overrides(cfg, ["model.ch", "optim.learning_rate"])
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.check_overrides(cfg, ["model.z_chanels"])
  msg = str(err.value)
  assert "'model.z_chanels'" in msg and "Valid keys under 'model': model.ch, model.ch_mult, model.z_channels" in msg
  assert "Did you mean 'model.z_channels'" in msg
  with pytest.raises(config_lib.ConfigError, match="at the top level: model, optim"):
    config_lib.check_overrides(cfg, ["modle.ch"])


def test_flag_check_exits_with_message(config_file):
  code = (
      "import sys; from ldm_jax.config import check_override_flags;"
      f"check_override_flags(['--config', {config_file!r}, '--config.model.chh=3'])"
  )
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert proc.returncode == 1
  assert "unknown config key 'model.chh'" in proc.stderr and "Traceback" not in proc.stderr


def test_write_config_round_trips(config_file, tmp_path):
  cfg = config_lib.load_config(config_file + ":tiny")
  path = config_lib.write_config(cfg, str(tmp_path / "run"))
  assert json.load(open(path))["model"]["ch"] == 32
