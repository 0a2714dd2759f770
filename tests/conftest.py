"""Test-wide setup: 8 fake CPU devices for sharding tests, quiet logs."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

# Must happen before any computation touches the backend.
jax.config.update("jax_num_cpu_devices", 8)
