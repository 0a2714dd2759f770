"""``compile_in_lockstep``: in a multi-process job the compile it does is the
one the next call uses, so the barrier after it really separates compiling
from running; with one process it does nothing. (The barrier itself, with two
real processes, runs in test_multiprocess.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.parallel import distributed
from ldm_jax.parallel.distributed import barrier, compile_in_lockstep

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.fixture
def compiles():
  """Names of the ``train_step`` programs XLA compiles while the test runs (persistent cache off)."""
  seen: list[str] = []

  def listener(event: str, duration: float, **kwargs) -> None:
    if event == BACKEND_COMPILE_EVENT and "train_step" in kwargs.get("fun_name", ""):
      seen.append(kwargs["fun_name"])

  cache_was_on = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)  # every compile is a real one, seen by the listener
  jax.monitoring.register_event_duration_secs_listener(listener)
  yield seen
  jax.monitoring.unregister_event_duration_listener(listener)
  jax.config.update("jax_enable_compilation_cache", cache_was_on)


def _step_and_inputs(seed: int):
  def train_step(s, x, scale):
    return jnp.tanh(s @ x).sum() * scale, s * 2

  rng = np.random.default_rng(seed)
  state, x = rng.normal(size=(3, 7)).astype(np.float32), rng.normal(size=(7, 5)).astype(np.float32)
  return jax.jit(train_step, donate_argnums=(0,)), state, x  # donated state, as in the real step


def test_the_call_after_compile_in_lockstep_compiles_nothing(compiles, monkeypatch):
  waited: list[str] = []
  # The view of one of two processes: the compile happens, then the barrier (recorded here).
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(distributed, "barrier", waited.append)
  step, state, x = _step_and_inputs(0)
  half = jnp.float32(0.5)
  compile_in_lockstep(step, jnp.asarray(state), x, half, name="test")
  assert len(compiles) == 1 and waited == ["compiled/test"]
  loss, doubled = step(jnp.asarray(state), x, half)
  assert len(compiles) == 1  # the call found the program compiled
  # A call with a new shape does compile: the listener would have seen it.
  step(jnp.asarray(state[:2]), x, half)
  assert len(compiles) == 2
  np.testing.assert_allclose(float(loss), np.tanh(state.astype(np.float64) @ x).sum() * 0.5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(doubled), state * 2)


def test_one_process_compiles_nothing_ahead_and_waits_for_no_one(compiles):
  assert jax.process_count() == 1
  step, state, x = _step_and_inputs(1)
  compile_in_lockstep(step, jnp.asarray(state), x, jnp.float32(0.5), name="alone")
  assert compiles == []
  barrier("alone", timeout_s=0.001)  # would time out at once if it waited for anyone
