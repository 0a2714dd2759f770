"""One process of a 2-process CPU training job (driven by test_multiprocess.py).

  python tests/multiprocess_worker.py PROCESS_ID PORT WORKDIR NUM_STEPS CACHE_DIR

Joins the job through ``setup_runtime`` (our ``jax.distributed.initialize``
path) with 4 CPU devices of its own, trains the tiny class-conditional LDM
with ``train_latent_diffusion`` on a (data=2, fsdp=4) mesh spanning both processes
(resuming if WORKDIR holds a checkpoint), and process 0 writes the gathered
final parameters to ``WORKDIR/final_params.npz``.
"""

import os
import sys

import jax

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process collectives on CPU
jax.config.update("jax_default_prng_impl", "rbg")  # as conftest: compiles faster on CPU

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(process_id: int, port: int, workdir: str, num_steps: int, cache_dir: str) -> None:
  import numpy as np
  from flax import traverse_util
  from jax.experimental import multihost_utils

  from ldm_jax.apps.train import train_latent_diffusion as train
  from ldm_jax.config import load_config
  from ldm_jax.parallel.runtime import setup_runtime

  setup_runtime(compilation_cache_dir=cache_dir, coordinator_address=f"localhost:{port}", num_processes=2,
                process_id=process_id)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  assert jax.process_count() == 2 and jax.local_device_count() == 4 and jax.device_count() == 8

  config = load_config("configs/ldm.py:shapes_class,tiny")
  config.mesh.shape = (2, 4, 1)
  config.mesh.fsdp_min_size = 2**12  # the tiny UNet's larger weights split across both processes
  config.train.update(num_steps=num_steps, checkpoint_every=2, log_every=1, batch_size=8)
  result = train(config, workdir)

  params = multihost_utils.process_allgather(result.state.params, tiled=True)
  if jax.process_index() == 0:
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    np.savez(os.path.join(workdir, "final_params.npz"), **{k: np.asarray(v) for k, v in flat.items()})
  multihost_utils.sync_global_devices("done")
  jax.distributed.shutdown()


if __name__ == "__main__":
  pid, port, workdir, steps, cache = sys.argv[1:6]
  main(int(pid), int(port), workdir, int(steps), cache)
