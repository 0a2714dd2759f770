"""The shared training loop on a toy regression: resume, NaN stop, SIGTERM, layout."""

import os
import signal

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.parallel import partitioning
from ldm_jax.training import checkpoint as ckpt_lib
from ldm_jax.training import loop
from ldm_jax.training.state import TrainState

D_IN, D_OUT, N = 16, 8, 64
_TX = optax.adam(0.2)
_DATA = np.random.default_rng(0).normal(size=(N, D_IN)).astype(np.float32)
_W_TRUE = np.random.default_rng(1).normal(size=(D_IN, D_OUT)).astype(np.float32)


def _init(rng, d_out=D_OUT):
  params = {"dense": {"kernel": jax.random.normal(rng, (D_IN, d_out)) * 0.1, "bias": jnp.zeros((d_out,))}}
  return TrainState.create(params, _TX)


def _make_step(nan_at=None):
  def step_fn(state, batch, rng, frozen):
    x = batch["x"] + 0.01 * jax.random.normal(rng, batch["x"].shape)  # uses the per-step rng
    y = batch["x"] @ _W_TRUE

    def loss_fn(p):
      return jnp.mean((x @ p["dense"]["kernel"] + p["dense"]["bias"] - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    if nan_at is not None:
      loss = jnp.where(state.step + 1 == nan_at, jnp.nan, loss)
    updates, opt_state = _TX.update(grads, state.opt_state, state.params)
    new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)
    return new, {"loss": loss}

  return step_fn


def _data_iterator(batch=8):
  ds = grain.MapDataset.source(_DATA).shuffle(seed=3).repeat().map(lambda x: {"x": x}).batch(batch)
  return ds.to_iter_dataset().__iter__()


def _run(workdir, num_steps, mesh, nan_at=None, hooks=(), checkpoint_every=4, init_fn=_init):
  it = _data_iterator()
  sharding = mesh_lib.batch_sharding(mesh, 2)
  batches = ({"x": jax.device_put(b["x"], sharding)} for b in it)
  cfg = loop.LoopConfig(num_steps=num_steps, log_every=2, checkpoint_every=checkpoint_every, global_batch_size=8,
                        progress_bar=False)
  return loop.train_loop(
      workdir=workdir, mesh=mesh, cfg=cfg, init_fn=init_fn, step_fn=_make_step(nan_at),
      batches=batches, data_iterator=it, rng=jax.random.key(0), hooks=hooks, meta={"note": "toy"},
  )


@pytest.fixture(scope="module")
def mesh():
  return mesh_lib.make_mesh(mesh_lib.default_mesh_config(), devices=jax.devices()[:2])


def test_resume_equals_uninterrupted_run(tmp_path, mesh):
  full = _run(str(tmp_path / "a"), 12, mesh)
  _run(str(tmp_path / "b"), 8, mesh)  # "killed" after step 8
  resumed = _run(str(tmp_path / "b"), 12, mesh)
  p0 = _init(jax.random.split(jax.random.key(0))[0]).params["dense"]
  initial_loss = np.mean((_DATA @ np.asarray(p0["kernel"]) - _DATA @ _W_TRUE) ** 2)
  assert resumed.step == 12 and full.last_metrics["loss"] < 0.5 * initial_loss
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(full.state), jax.device_get(resumed.state))


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, mesh):
  with pytest.raises(loop.NonFiniteLossError, match=r"'loss' is nan at step 7.*step 4"):
    _run(str(tmp_path), 12, mesh, nan_at=7)
  assert ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [4]


def test_sigterm_saves_and_stops(tmp_path, mesh):
  hook = loop.Hook(every=3, fn=lambda step, state: os.kill(os.getpid(), signal.SIGTERM))
  result = _run(str(tmp_path), 12, mesh, hooks=[hook], checkpoint_every=100)
  assert result.preempted and result.step == 3
  assert ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 3


def test_checkpoint_of_wrong_shape_is_named(tmp_path, mesh):
  _run(str(tmp_path), 4, mesh)
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"dense/kernel: checkpoint \(16, 8\) vs model \(16, 4\)"):
    _run(str(tmp_path), 8, mesh, init_fn=lambda rng: _init(rng, d_out=4))


def test_fsdp_rules_split_large_weights():
  mesh = mesh_lib.make_mesh(_mesh_cfg((2, 4, 1)))
  abstract = {"big": jax.ShapeDtypeStruct((320, 1280), jnp.float32), "small": jax.ShapeDtypeStruct((320,), jnp.float32),
              "attn": {"to_q": {"kernel": jax.ShapeDtypeStruct((320, 320), jnp.float32)}}}
  sh = partitioning.state_shardings(abstract, mesh, fsdp_min_size=1000)
  assert sh["big"].spec == P(None, "fsdp") and sh["small"].spec == P(None)
  x = jax.device_put(jnp.ones((320, 1280)), sh["big"])
  assert {s.data.nbytes for s in x.addressable_shards} == {320 * 1280 * 4 // 4}


def _mesh_cfg(shape):
  cfg = mesh_lib.default_mesh_config()
  cfg.shape = shape
  return cfg


def test_tensor_rules_and_unplaceable_weight():
  mesh = mesh_lib.make_mesh(_mesh_cfg((2, 2, 2)))
  spec = partitioning.spec_for("unet/attn1/to_q/kernel", (320, 320), mesh, fsdp_min_size=1000)
  assert spec == P("fsdp", "tensor")
  spec = partitioning.spec_for("unet/attn1/to_out_0/kernel", (320, 320), mesh, fsdp_min_size=1000)
  assert spec == P("tensor", "fsdp")
  with pytest.raises(partitioning.PartitionError, match=r"odd/kernel of shape \(3, 333\).*fsdp axis size 2"):
    partitioning.spec_for("odd/kernel", (3, 333), mesh, fsdp_min_size=100)


def test_mesh_errors_name_sizes():
  with pytest.raises(ValueError, match="needs 6 devices but 8 are available"):
    mesh_lib.make_mesh(_mesh_cfg((2, 3, 1)))
  mesh = mesh_lib.make_mesh(_mesh_cfg((2, 4, 1)))
  with pytest.raises(ValueError, match=r"batch_size=12 is not divisible by the data-parallel size 8"):
    mesh_lib.check_batch_size(12, mesh)
