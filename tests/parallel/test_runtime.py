"""``mesh.cpu_devices``: the CPU split into several JAX devices, before JAX
creates its backends (so in a fresh interpreter), unless XLA_FLAGS already
forces a count; too late, it fails with a message naming the setting."""

import os
import subprocess
import sys

import jax
import pytest

from ldm_jax.parallel.runtime import split_cpu

_PROBE = (
    "from ldm_jax.parallel.runtime import setup_runtime; "
    "setup_runtime(compilation_cache_dir=None, cpu_devices={n}); "
    "import jax; "
    "print(jax.device_count(), jax.devices()[0].platform)"
)


def _device_count(n: int, xla_flags: str) -> tuple[int, str]:
  env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _PROBE.format(n=n)], env=env, capture_output=True, text=True,
                       timeout=120, check=True)
  count, platform = out.stdout.split()[-2:]
  return int(count), platform


@pytest.mark.parametrize("n, flags, expected", [
    (2, "", 2),
    (0, "", 1),  # 0 leaves JAX's single CPU device
    (2, "--xla_force_host_platform_device_count=3", 3),  # the user's explicit count wins
])
def test_cpu_devices_sets_the_device_count(n, flags, expected):
  assert _device_count(n, flags) == (expected, "cpu")


def test_cpu_devices_after_backends_exist_names_the_setting():
  assert jax.device_count() == 8  # creates conftest's 8-device backend if no test has yet
  with pytest.raises(RuntimeError, match=r"mesh.cpu_devices=2 must be applied before JAX creates its devices"):
    split_cpu(2)
