"""``compile_in_lockstep``: the compile it does is the one the next call uses,
so a barrier placed after it really separates compiling from running (the
barrier itself, with two processes, runs in test_multiprocess.py)."""

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.training.distributed import barrier, compile_in_lockstep

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def test_the_call_after_compile_in_lockstep_compiles_nothing():
  compiles: list[str] = []

  def listener(event: str, duration: float, **kwargs) -> None:
    if event == BACKEND_COMPILE_EVENT and "train_step" in kwargs.get("fun_name", ""):
      compiles.append(kwargs["fun_name"])

  rng = np.random.default_rng(0)
  state, x = rng.normal(size=(3, 7)).astype(np.float32), rng.normal(size=(7, 5)).astype(np.float32)

  def train_step(s, x, scale):
    return jnp.tanh(s @ x).sum() * scale, s * 2

  step = jax.jit(train_step, donate_argnums=(0,))  # donated state, as in the real step
  half = jnp.float32(0.5)
  cache_was_on = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)  # every compile is a real one, seen by the listener
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    compile_in_lockstep(step, jnp.asarray(state), x, half, name="test")
    assert len(compiles) == 1
    loss, doubled = step(jnp.asarray(state), x, half)
    assert len(compiles) == 1  # the call found the program compiled
    # A call with a new shape does compile: the listener would have seen it.
    step(jnp.asarray(state[:2]), x, half)
    assert len(compiles) == 2
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
    jax.config.update("jax_enable_compilation_cache", cache_was_on)
  np.testing.assert_allclose(float(loss), np.tanh(state.astype(np.float64) @ x).sum() * 0.5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(doubled), state * 2)


def test_barrier_is_a_no_op_in_one_process():
  assert jax.process_count() == 1
  barrier("alone", timeout_s=0.001)  # would time out at once if it waited for anyone
