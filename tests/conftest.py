"""Test-wide setup: 8 fake CPU devices for sharding tests, quick compiles
(shared through a persistent compilation cache), quiet logs."""

import logging
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The suite's programs are tiny and run a few steps, so compiling dominates:
# LLVM at -O0 compiles them faster and runs the same arithmetic (figures in
# docs/testing.md).
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

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


# One tiny text-to-image run (4 steps, the periodic FID hook on with a random
# shapes-judge file) serves sample.py's and evaluate.py's tests. Those files
# usually run on different xdist workers, so the first to ask trains it under a
# file lock in the directory all workers share; the other reuses it.


@pytest.fixture(scope="session")
def tiny_txt2img_run(tmp_path_factory) -> dict:
  """``{"workdir", "config", "judge", "judge_params"}`` of the shared tiny run (read it, never write into it)."""
  from filelock import FileLock

  from ldm_jax.config import load_config
  from ldm_jax.evaluation.shapes_judge import ShapesJudge
  from ldm_jax.interop import feature_nets

  base = tmp_path_factory.getbasetemp()
  # Under xdist each worker's basetemp sits in this session's folder; without
  # xdist the parent would be shared with earlier sessions (and their stale runs).
  shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  root = shared / "tiny_txt2img"
  config = load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "configs/ldm.py:shapes_txt2img,tiny"))
  config.data.data_dir = str(root / "data")
  config.data.shapes.update(num_train=16, num_validation=32, num_test=8)
  judge = str(root / "judge.npz")
  config.eval.update(every=2, num_samples=16, batch_size=8, num_steps=4, feature_net="shapes_judge",
                     judge_weights=judge)
  # Deterministic, so every worker holds the weights the file has.
  params = jax.jit(ShapesJudge().init)(jax.random.key(3), np.zeros((1, 32, 32, 3)))
  run = {"workdir": str(root / "run"), "config": config, "judge": judge, "judge_params": params}
  with FileLock(str(shared / "tiny_txt2img.lock")):
    if not (root / "done").exists():
      from ldm_jax.apps.train import train_latent_diffusion as train

      root.mkdir(exist_ok=True)
      feature_nets.save_judge(judge, params)
      train(config, run["workdir"])
      (root / "done").touch()
  return run


# Longest files first, so that under `pytest -n 2 --dist loadfile` the two
# workers finish together instead of one running a long file alone at the end
# (xdist hands out files in collection order once `--no-loadscope-reorder`
# stops it from sorting them by test count). Seconds of one worker's time in a
# cold-cache run on a 2-core machine (`--durations=0`, summed per file); the
# rest keep their alphabetical order after these.
FILE_SECONDS = {
    "test_demo.py": 232,
    "test_sd_finetune.py": 190,
    "test_train_ldm_variants.py": 190,
    "test_sample_cli.py": 166,
    "test_interop_pretrained.py": 148,
    "test_multiprocess.py": 123,
    "test_train_autoencoder.py": 118,
    "test_sharding.py": 84,
    "test_samplers_gaussian.py": 70,
    "test_eval_shapes_judge.py": 61,
    "test_device_check.py": 90,
    "test_benchmarks.py": 67,
    "test_autoencoder_loss.py": 53,
    "test_unet_model.py": 51,
}


def pytest_collection_modifyitems(config, items) -> None:
  items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))  # stable: within a file, and the rest
