"""Two local processes joined by ``jax.distributed.initialize`` (CPU, gloo
collectives), 4 devices each, train the tiny LDM on one (data=2, fsdp=4)
mesh; a fresh pair restored from the step-2 checkpoint continues to exactly
the parameters and losses of the uninterrupted run.

The expensive part: two pairs of processes, each compiling the tiny step
(a multi-process CPU job runs without the persistent compile cache: see
``setup_runtime``). Marked slow.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "multiprocess_worker.py")
CACHE = os.environ.get("LDM_JAX_TEST_CACHE", os.path.join(tempfile.gettempdir(), "ldm_jax_test_xla_cache"))
TIMEOUT_S = 900


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_pair(workdir: str, num_steps: int) -> None:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  # -O0 as in conftest: these processes compile far more than they compute.
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  port = str(_free_port())
  os.makedirs(workdir, exist_ok=True)
  # Logs go to files: a pipe read only after the other process ends fills up
  # (64 KiB of warnings suffice), blocks its writer, and the pair deadlocks.
  logs = [open(os.path.join(workdir, f"process_{i}.log"), "w") for i in range(2)]
  procs = [
      subprocess.Popen([sys.executable, WORKER, str(i), port, workdir, str(num_steps), CACHE], env=env,
                       stdout=logs[i], stderr=subprocess.STDOUT)
      for i in range(2)
  ]
  try:
    for p in procs:
      p.wait(timeout=TIMEOUT_S)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for log in logs:
      log.close()
  for i, p in enumerate(procs):
    with open(logs[i].name) as f:
      assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{f.read()[-4000:]}"


def _losses(workdir: str) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.mark.slow
def test_two_processes_checkpoint_and_resume_equal_one_run(tmp_path):
  full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
  _run_pair(full, 4)
  # The "preempted" run: only the step-2 checkpoint survives; a fresh pair resumes.
  os.makedirs(os.path.join(resumed, "checkpoints"))
  shutil.copytree(os.path.join(full, "checkpoints", "2"), os.path.join(resumed, "checkpoints", "2"))
  _run_pair(resumed, 4)

  a, b = np.load(os.path.join(full, "final_params.npz")), np.load(os.path.join(resumed, "final_params.npz"))
  assert sorted(a.files) == sorted(b.files) and len(a.files) > 10
  for k in a.files:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  la, lb = _losses(full), _losses(resumed)
  assert sorted(la) == [1, 2, 3, 4] and sorted(lb) == [3, 4], (la, lb)
  assert all(np.isfinite(v) for v in la.values())
  np.testing.assert_array_equal([la[3], la[4]], [lb[3], lb[4]])
