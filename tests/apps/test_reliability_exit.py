"""Exit statuses (issue 31, item 5): a run stopped by SIGTERM exits with ``PREEMPTED_EXIT_CODE``, not 0 like a
finished one, also when the SIGTERM comes during start-up, before the training loop handles it.

Each case runs ``train.py`` / ``demo.py`` in a fresh Python with what it would load stubbed out, so it takes
seconds; the loop's own SIGTERM handling is tested in ``test_training_loop.py``.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from ldm_jax.training.preemption import PREEMPTED_EXIT_CODE

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Stubs installed before the script runs (its imports of them happen inside main()).
_START_UP_SIGTERM = """
import ldm_jax.parallel.runtime as runtime
runtime.setup_runtime = lambda **kw: os.kill(os.getpid(), signal.SIGTERM)  # arrives while starting up
"""
_PREEMPTED_TRAINING = """
import types
import ldm_jax.parallel.runtime as runtime
runtime.setup_runtime = lambda **kw: None
stub = types.ModuleType("ldm_jax.apps.train")
stub.STAGES = ("autoencoder", "ldm")
stub.check = lambda config: None  # the config is fine; this drill is about the exit status
stub.train = lambda config, workdir: types.SimpleNamespace(preempted=True, step=3)  # the loop saw SIGTERM
sys.modules["ldm_jax.apps.train"] = stub
"""
_PREEMPTED_DEMO = """
import types
import ml_collections
import ldm_jax.parallel.runtime as runtime
runtime.setup_runtime = lambda **kw: None
stub = types.ModuleType("ldm_jax.apps.demo")
class DemoPreempted(RuntimeError):
  pass
def run_demo(workdir, settings):
  raise DemoPreempted("stage 2 was stopped (SIGTERM) at step 7, its checkpoint saved; run the same command to resume")
stub.DemoPreempted, stub.run_demo, stub.parse_override = DemoPreempted, run_demo, lambda o: o
stub.DemoSettings = lambda **kw: kw
stub.demo_configs = lambda workdir, settings: (ml_collections.ConfigDict({"mesh": {"cpu_devices": 0}}), None)
sys.modules["ldm_jax.apps.demo"] = stub
"""


def _run(script: str, stubs: str, *args: str) -> subprocess.CompletedProcess:
  program = f"import os, runpy, signal, sys\n{textwrap.dedent(stubs)}\nsys.argv = {[script, *args]!r}\n" \
            f"runpy.run_path({script!r}, run_name='__main__')\n"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
  return subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=120)


@pytest.mark.parametrize("script, stubs, want", [
    ("train.py", _START_UP_SIGTERM, PREEMPTED_EXIT_CODE),
    ("train.py", _PREEMPTED_TRAINING, PREEMPTED_EXIT_CODE),
    ("demo.py", _PREEMPTED_DEMO, PREEMPTED_EXIT_CODE),
], ids=["train-sigterm-at-start-up", "train-preempted", "demo-preempted"])
def test_exit_status(script, stubs, want, tmp_path):
  args = ["--workdir", str(tmp_path)]
  if script == "train.py":
    args += ["--config", "configs/ldm.py:shapes_txt2img,tiny"]
  done = _run(script, stubs, *args)
  assert done.returncode == want, done.stderr[-3000:]
  assert "Traceback" not in done.stderr, done.stderr[-3000:]
  assert PREEMPTED_EXIT_CODE == 143  # documented in train.py and demo.py: 128 + SIGTERM, as a shell reports a kill
