"""No host stalls in the training loop (issue 30): the steady-state step runs under ``jax.transfer_guard``
with no implicit host<->device copy, and a checkpoint is written while training goes on.

The toy regression of ``toy_training`` runs the real loop in milliseconds per step.
"""

import os
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import toy_training as toy

from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.training import checkpoint as ckpt_lib
from ldm_jax.training import loop


@pytest.fixture(scope="module")
def mesh():
  return toy.two_device_mesh()


def _numpy_from(step: int, mesh):
  """Toy data whose batches stay NumPy (an implicit copy at the step call) from batch ``step`` on."""
  batches, data_iterator = toy.toy_data()
  sharding = mesh_lib.batch_sharding(mesh, 2)

  def mixed():
    for i, b in enumerate(batches, start=1):
      yield {"x": b["x"] if i >= step else jax.device_put(b["x"], sharding)}

  return mixed(), data_iterator


def test_steady_state_steps_make_no_implicit_transfer(tmp_path, mesh):
  """The guard is on by default; the loop's own arguments (state, the per-step key, frozen weights)
  stay on their shardings, so 6 guarded steps run (an uncommitted key was copied to both devices per step)."""
  assert loop.LoopConfig(num_steps=1).transfer_guard == "disallow"
  result = toy.run(tmp_path, 6, mesh, checkpoint_every=100)
  assert result.step == 6 and np.isfinite(result.last_metrics["loss"])


def test_an_implicit_transfer_in_a_steady_state_step_is_caught(tmp_path, mesh):
  # NumPy batches from step 3 on: toy.run puts every batch on the device itself, so build the run by hand.
  batches, data_iterator = _numpy_from(3, mesh)
  cfg = loop.LoopConfig(num_steps=6, log_every=2, checkpoint_every=100, global_batch_size=8, progress_bar=False)
  with pytest.raises(loop.HostTransferError, match=r"^step 3: an implicit transfer .*Disallowed host-to-device"):
    loop.train_loop(workdir=str(tmp_path), mesh=mesh, cfg=cfg, init_fn=toy.init, step_fn=toy.make_step(),
                    batches=batches, data_iterator=data_iterator, rng=jax.random.key(0))


def test_the_first_step_is_not_guarded_and_allow_turns_the_check_off(tmp_path, mesh):
  batches, data_iterator = _numpy_from(1, mesh)
  cfg = loop.LoopConfig(num_steps=3, log_every=1, checkpoint_every=100, global_batch_size=8, progress_bar=False,
                        transfer_guard="allow")
  result = loop.train_loop(workdir=str(tmp_path / "a"), mesh=mesh, cfg=cfg, init_fn=toy.init,
                           step_fn=toy.make_step(), batches=batches, data_iterator=data_iterator,
                           rng=jax.random.key(0))
  assert result.step == 3
  batches, data_iterator = _numpy_from(1, mesh)
  cfg.transfer_guard = "disallow"
  with pytest.raises(loop.HostTransferError, match=r"^step 2: "):  # step 1 (compiles) ran with a NumPy batch
    loop.train_loop(workdir=str(tmp_path / "b"), mesh=mesh, cfg=cfg, init_fn=toy.init, step_fn=toy.make_step(),
                    batches=batches, data_iterator=data_iterator, rng=jax.random.key(0))
  cfg.transfer_guard = "never"
  with pytest.raises(ValueError, match=r"transfer_guard must be one of .*'never'"):
    loop.train_loop(workdir=str(tmp_path / "c"), mesh=mesh, cfg=cfg, init_fn=toy.init, step_fn=toy.make_step(),
                    batches=batches, data_iterator=data_iterator, rng=jax.random.key(0))


def test_training_goes_on_while_a_save_is_in_flight(tmp_path, mesh, monkeypatch):
  """Checkpoint 4's write is held back (its metadata waits for an event) until step 6: steps 5 and 6 run
  while it is unfinished, and what it finally holds is exactly the state of step 4 (not a later one: the
  state is donated to step 5 while the save is in flight)."""
  release = threading.Event()
  save_fn = ocp.JsonCheckpointHandler._save_fn

  async def held_save_fn(self, item, directory):
    if item.get("hold"):
      release.wait(timeout=20)  # in orbax's writer thread; a synchronous save would block the loop here
    await save_fn(self, item, directory)

  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", held_save_fn)
  ckpts = tmp_path / "checkpoints"
  at_step_4, in_flight = {}, []

  def watch(step, state):
    if step == 4:
      at_step_4["state"] = jax.device_get(state)
    if step in (5, 6):
      if not os.path.isdir(ckpts / "4"):  # orbax renames its temporary folder to "4" once the save is complete
        in_flight.append(step)
    if step == 6:
      release.set()

  def meta(state):
    return {"note": "toy", "hold": int(jax.device_get(state.step)) == 4}

  result = toy.run(tmp_path, 8, mesh, checkpoint_every=4, meta=meta, hooks=[loop.Hook(1, watch)])
  assert result.step == 8 and in_flight == [5, 6]

  device = jax.sharding.make_single_device_sharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          jax.eval_shape(toy.init, jax.random.key(0)))
  checkpointer = ckpt_lib.Checkpointer(str(ckpts))
  saved, _ = checkpointer.restore(4, abstract)
  assert checkpointer.all_steps() == [4, 8] and checkpointer.read_meta(4)["hold"] and int(saved.step) == 4
  checkpointer.close()
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(saved), at_step_4["state"])


def test_scalar_metrics_come_back_as_one_vector(mesh):
  """One device-to-host copy per step at the flush: the step's float/bool scalars are packed, and unpacked
  under their names they equal the unjitted step's metrics (float32 tolerance); integer metrics stay apart."""

  def step_fn(state, batch, rng, frozen):
    state, metrics = toy.make_step()(state, batch, rng, frozen)
    return state, {**metrics, "count": jax.numpy.asarray(7, jax.numpy.int32)}

  state = toy.init(jax.random.key(1))
  abstract, shardings = loop.create_sharded_state(toy.init, jax.random.key(1), mesh, loop.LoopConfig(num_steps=1))
  batch = {"x": jax.device_put(toy.DATA[:8], mesh_lib.batch_sharding(mesh, 2))}
  rng = jax.device_put(jax.random.key(2), mesh_lib.replicated(mesh))
  _, expected = step_fn(state, batch, jax.random.fold_in(rng, state.step), None)
  jitted = loop.jit_step(step_fn, mesh, shardings, batch)
  _, metrics = jitted(jax.device_put(state, shardings), batch, rng, None)
  assert set(metrics) == {loop.PACKED, "count"} and metrics[loop.PACKED].shape == (3,)
  assert jitted.metric_names == ["grad_norm", "loss", loop.STATE_FINITE]
  got = loop.unpack_metrics(jax.device_get(metrics), jitted.metric_names)
  assert got[loop.STATE_FINITE] == 1.0 and got["count"] == 7
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(got[key], float(expected[key]), rtol=1e-5)
