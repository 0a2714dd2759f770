"""A toy regression trained by the shared loop in milliseconds per step (tests/*/test_reliability_*.py).

``run`` trains it in a work directory; ``blow_up_at`` makes one step's update
overflow the weights (as a far too high learning rate does) while that step's
loss, computed before the update, stays finite.
"""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.training import loop
from ldm_jax.training.checkpoint import restore_subtree
from ldm_jax.training.state import TrainState

D_IN, D_OUT, N = 16, 8, 64
TX = optax.adam(0.1)
DATA = np.random.default_rng(0).normal(size=(N, D_IN)).astype(np.float32)
W_TRUE = np.random.default_rng(1).normal(size=(D_IN, D_OUT)).astype(np.float32)


def init(rng):
  params = {"dense": {"kernel": jax.random.normal(rng, (D_IN, D_OUT)) * 0.1, "bias": jnp.zeros((D_OUT,))}}
  return TrainState.create(params, TX)


def make_step(blow_up_at: int | None = None):
  def step_fn(state, batch, rng, frozen):
    x = batch["x"] + 0.01 * jax.random.normal(rng, batch["x"].shape)
    y = batch["x"] @ W_TRUE

    def loss_fn(p):
      return jnp.mean((x @ p["dense"]["kernel"] + p["dense"]["bias"] - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = TX.update(grads, state.opt_state, state.params)
    if blow_up_at is not None:
      updates = jax.tree.map(lambda u: jnp.where(state.step + 1 == blow_up_at, u + jnp.inf, u), updates)
    new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)
    return new, {"loss": loss, "grad_norm": loop.global_norm(grads)}

  return step_fn


def toy_data(batch: int = 8):
  """``(batches, data_iterator)`` of the regression inputs, checkpointable."""
  it = grain.MapDataset.source(DATA).shuffle(seed=3).repeat().map(lambda x: {"x": x}).batch(batch)
  it = it.to_iter_dataset().__iter__()
  return ({"x": b["x"]} for b in it), it


def run(workdir, num_steps: int, mesh, *, checkpoint_every: int = 4, keep: int = 3, blow_up_at: int | None = None,
        data=None, hooks=(), meta=None) -> loop.TrainResult:
  batches, data_iterator = data if data is not None else toy_data()
  sharding = mesh_lib.batch_sharding(mesh, 2)
  cfg = loop.LoopConfig(num_steps=num_steps, log_every=2, checkpoint_every=checkpoint_every, keep_checkpoints=keep,
                        global_batch_size=8, progress_bar=False)
  return loop.train_loop(
      workdir=str(workdir), mesh=mesh, cfg=cfg, init_fn=init, step_fn=make_step(blow_up_at),
      batches=({"x": jax.device_put(b["x"], sharding)} for b in batches), data_iterator=data_iterator,
      rng=jax.random.key(0), hooks=hooks, meta=meta if meta is not None else {"note": "toy"},
  )


def two_device_mesh():
  return mesh_lib.make_mesh(mesh_lib.default_mesh_config(), devices=jax.devices()[:2])


def restored_params(workdir, step: int):
  """Checkpoint ``step``'s params, on the host."""
  abstract = jax.eval_shape(init, jax.random.key(0)).params
  device = jax.sharding.make_single_device_sharding(jax.devices()[0])
  params = restore_subtree(str(workdir / "checkpoints"), step, ("params",), abstract, device, what="toy params")
  return jax.device_get(params)
