"""Experiment configs: loading `configs/*.py`, checking overrides, saving.

Config files define ``get_config(arg: str | None) -> ConfigDict`` (big_vision
style); ``arg`` is a comma-separated list of variant words. Entry points use
absl's ``config_flags`` for ``--config FILE[:ARG] --config.a.b=VALUE``; before
absl parses them, :func:`check_override_flags` turns a misspelt key into an
error that lists the valid keys near it instead of a traceback.
"""

import difflib
import importlib.util
import json
import os
import sys
from collections.abc import Sequence

import ml_collections


class ConfigError(ValueError):
  """A config file, variant or override that cannot be used."""


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads ``"configs/FILE.py[:ARG]"`` the way ``config_flags`` does."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location(f"_ldm_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} defines no get_config(arg)")
  return module.get_config(arg or None)


def parse_variants(arg: str | None, known: Sequence[str]) -> list[str]:
  """Splits ``"kl_f8,tiny"`` into words, rejecting unknown ones by name."""
  words = [w for w in (arg or "").split(",") if w]
  for w in words:
    if w not in known:
      near = difflib.get_close_matches(w, known, n=3)
      hint = f" Did you mean {', '.join(near)}?" if near else ""
      raise ConfigError(f"unknown config variant {w!r}; valid variants: {', '.join(known)}.{hint}")
  return words


def _all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for k, v in config.items():
    keys.append(prefix + k)
    if isinstance(v, ml_collections.ConfigDict):
      keys.extend(_all_keys(v, prefix + k + "."))
  return keys


def check_overrides(config: ml_collections.ConfigDict, keys: Sequence[str]) -> None:
  """Raises :class:`ConfigError` for any override key the config lacks."""
  valid = set(_all_keys(config))
  for key in keys:
    if key in valid:
      continue
    parent, _, _ = key.rpartition(".")
    while parent and parent not in valid:
      parent, _, _ = parent.rpartition(".")
    siblings = sorted(k for k in valid if k.rpartition(".")[0] == parent)
    near = difflib.get_close_matches(key, sorted(valid), n=3, cutoff=0.6)
    where = f"under {parent!r}" if parent else "at the top level"
    msg = f"unknown config key {key!r}. Valid keys {where}: {', '.join(siblings)}."
    if near:
      msg += f" Did you mean {' or '.join(repr(n) for n in near)}?"
    raise ConfigError(msg)


def check_override_flags(argv: Sequence[str], flag_name: str = "config") -> None:
  """Validates ``--config.x.y=v`` flags in ``argv`` before absl parses them.

  Exits with a one-paragraph message (no traceback) on an unknown key, a
  missing config file or an unknown variant.
  """
  spec, keys = None, []
  for i, a in enumerate(argv):
    if a.startswith(f"--{flag_name}="):
      spec = a.split("=", 1)[1]
    elif a == f"--{flag_name}" and i + 1 < len(argv):
      spec = argv[i + 1]
    elif a.startswith(f"--{flag_name}."):
      keys.append(a[len(flag_name) + 3 :].split("=", 1)[0])
  if spec is None:
    return
  try:
    check_overrides(load_config(spec), keys)
  except ConfigError as e:
    sys.exit(f"error: {e}")


def write_config(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes the fully resolved config to ``workdir/config.json`` (and .yaml)."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  with open(path, "w") as f:
    json.dump(config.to_dict(), f, indent=2, sort_keys=True, default=str)
  with open(os.path.join(workdir, "config.yaml"), "w") as f:
    f.write(config.to_yaml())
  return path
