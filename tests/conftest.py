"""Test-wide setup: 8 fake CPU devices for sharding tests, a shared
persistent compilation cache, quiet logs."""

import logging
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

# Must happen before any computation touches the backend.
jax.config.update("jax_num_cpu_devices", 8)

# threefry's unrolled hash takes seconds to compile per random op on CPU; rbg
# is as good for tests (none depends on particular random values).
jax.config.update("jax_default_prng_impl", "rbg")

# Identical programs built by different tests (or by a resumed run in the
# same test) compile once per session; xdist workers share the directory.
_CACHE = os.environ.get("LDM_JAX_TEST_CACHE", os.path.join(tempfile.gettempdir(), "ldm_jax_test_xla_cache"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

logging.getLogger("absl").setLevel(logging.WARNING)
