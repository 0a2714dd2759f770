"""The stage-2 train step sharded on a (2, 4) data x fsdp mesh of 8 fake CPU
devices equals the single-device step; FSDP really splits weights; remat and
gradient accumulation under sharding change memory, not results; layout
errors name the sizes.

The step is the real one (``ldm_step.make_train_step``) compiled by the
loop's own code (``loop.create_sharded_state``, ``loop.jit_step``). The
optimiser is SGD with momentum: its first update is ``-lr * grad``, so
comparing updates compares gradients (Adam's first update is about
``sign(grad)``, which would turn rounding noise on near-zero gradients into
full-size differences).
"""

import dataclasses

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from ldm_jax.assembly import build_model, example_inputs, random_first_stage, schedule_from_config, step_config
from ldm_jax.config import load_config
from ldm_jax.data.tokenizers import build_shapes_tokenizer, tokenize
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.parallel import partitioning
from ldm_jax.training import ldm_step, loop

CAPTIONS = ["a large red circle", "a small blue square", "a large green star", "a small yellow triangle"] * 4
FSDP_MIN = 2**10  # small enough that the tiny UNet's convs and projections split
_TX = optax.sgd(0.5, momentum=0.9)
# float32 sums in another order (per-device partial sums + all-reduce): the
# loss agrees to rtol 1e-5, each update to 1e-4 of its leaf's largest entry.
LOSS_RTOL, UPDATE_TOL = 1e-5, 1e-4


def _mesh(shape, n):
  cfg = mesh_lib.default_mesh_config()
  cfg.shape = shape
  return mesh_lib.make_mesh(cfg, devices=jax.devices()[:n])


@pytest.fixture(scope="module")
def setup():
  config = load_config("configs/ldm.py:shapes_txt2img,tiny")
  tokenizer = build_shapes_tokenizer()
  variables, fs_config, scale = random_first_stage(config.first_stage, config.data.image_size)
  tokens, _ = tokenize(tokenizer, CAPTIONS, config.data.tokenizer.max_length)
  rng = np.random.default_rng(4)
  # Cached posterior moments (as the latent cache feeds them): the step
  # skips the first-stage encoder, which keeps compilation short.
  batch = {
      "latent_mean": rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
      "latent_logvar": rng.uniform(-6, -2, size=(16, 8, 8, 3)).astype(np.float32),
      "tokens": np.asarray(tokens),
  }
  return config, tokenizer, fs_config, scale, {"first_stage": variables}, batch


def _pieces(setup, remat="none", grad_accum_steps=1):
  config, tokenizer, fs_config, scale, frozen, _ = setup
  config = config.copy_and_resolve_references()
  config.unet.remat_policy = remat
  model = build_model(config, fs_config, scale, tokenizer)
  cfg = dataclasses.replace(step_config(config), cond_dropout=0.25, grad_accum_steps=grad_accum_steps)
  init = ldm_step.make_init_fn(model, _TX, cfg, example_inputs(model, config), frozen, (1, 8, 8, 3))
  step = ldm_step.make_train_step(model, schedule_from_config(config.diffusion), _TX, cfg)
  return init, step


def _place(mesh, host_state, frozen, batch, init):
  loop_cfg = loop.LoopConfig(num_steps=1, fsdp_min_size=FSDP_MIN)
  _, shardings = loop.create_sharded_state(init, jax.random.key(0), mesh, loop_cfg)
  state = jax.device_put(host_state, shardings)
  frozen = jax.device_put(frozen, partitioning.state_shardings(frozen, mesh, fsdp_min_size=FSDP_MIN))
  batch = {k: jax.device_put(v, mesh_lib.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
  return state, shardings, frozen, batch


@pytest.fixture(scope="module")
def runs(setup):
  """Initial state (created sharded), and one step on 1 device and on the (2, 4) mesh."""
  *_, frozen, batch = setup
  init, step = _pieces(setup)
  mesh8 = _mesh((2, 4, 1), 8)
  _, shardings = loop.create_sharded_state(init, jax.random.key(0), mesh8, loop.LoopConfig(1, fsdp_min_size=FSDP_MIN))
  sharded_init = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
  host_init = jax.device_get(sharded_init)
  out = {"init": host_init, "sharded_init": sharded_init, "mesh8": mesh8}
  for name, mesh in (("single", _mesh((1, 1, 1), 1)), ("sharded", mesh8)):
    state, sh, fz, b = _place(mesh, host_init, frozen, batch, init)
    jitted = loop.jit_step(step, mesh, sh, b, fz)
    new, metrics = jitted(state, b, jax.random.key(5), fz)
    out[name] = (jax.device_get(new), loop.unpack_metrics(jax.device_get(metrics), jitted.metric_names))
  return out


def _assert_same_updates(initial, a, b):
  def check(p0, pa, pb):
    da, db = np.asarray(pa) - np.asarray(p0), np.asarray(pb) - np.asarray(p0)
    scale = max(np.abs(db).max(), 1e-12)
    assert np.abs(da - db).max() <= UPDATE_TOL * scale, (np.abs(da - db).max(), scale)

  jax.tree.map(check, initial, a, b)


def test_sharded_step_equals_single_device_step(runs):
  (single, m1), (sharded, m8) = runs["single"], runs["sharded"]
  assert np.isfinite(m1["loss"]) and m1["loss"] > 0
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=LOSS_RTOL)
  np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-4)
  assert int(sharded.step) == int(single.step) == 1
  _assert_same_updates(runs["init"].params, sharded.params, single.params)
  _assert_same_updates(runs["init"].params, sharded.ema_params, single.ema_params)
  # SGD's momentum trace after one step is the gradient itself.
  trace = lambda s: jax.tree.leaves(s.opt_state)  # noqa: E731
  for a, b in zip(trace(sharded), trace(single)):
    np.testing.assert_allclose(a, b, atol=UPDATE_TOL * max(np.abs(b).max(), 1e-12))


def test_large_weights_are_split_over_fsdp(runs):
  state, mesh = runs["sharded_init"], runs["mesh8"]
  flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(state)}
  split = {k: x for k, x in flat.items() if "fsdp" in jax.tree.leaves(tuple(x.sharding.spec))}
  assert len(split) > 20, sorted(flat)
  for k, x in flat.items():
    if x.size >= FSDP_MIN:
      assert k in split, f"{k} {x.shape} with {x.size} elements is not split"
  biggest = max(flat.values(), key=lambda x: x.size)
  for k, x in split.items():
    assert len(x.addressable_shards) == 8
    # data x fsdp = 2 x 4: each device holds a quarter, the data axis replicates.
    assert {s.data.nbytes for s in x.addressable_shards} == {x.nbytes // 4}, k
  assert biggest.addressable_shards[0].data.nbytes * 4 == biggest.nbytes
  per_device = sum(x.addressable_shards[0].data.nbytes for x in flat.values())
  total = sum(x.nbytes for x in flat.values())
  assert per_device < 0.3 * total, (per_device, total)  # close to 1/4: only small arrays replicate
  assert mesh.shape == {"data": 2, "fsdp": 4, "tensor": 1}


def test_remat_and_grad_accumulation_sharded_change_memory_not_results(setup, runs):
  *_, frozen, batch = setup
  init, step = _pieces(setup, remat="save_dots", grad_accum_steps=2)
  mesh = runs["mesh8"]
  state, sh, fz, b = _place(mesh, runs["init"], frozen, batch, init)
  jitted = loop.jit_step(step, mesh, sh, b, fz)
  new, metrics = jax.device_get(jitted(state, b, jax.random.key(5), fz))
  metrics = loop.unpack_metrics(metrics, jitted.metric_names)
  single, m1 = runs["single"]
  np.testing.assert_allclose(metrics["loss"], m1["loss"], rtol=LOSS_RTOL)
  _assert_same_updates(runs["init"].params, new.params, single.params)


def test_misplaced_batch_fails_instead_of_resharding(setup, runs):
  *_, frozen, batch = setup
  init, step = _pieces(setup)
  mesh = runs["mesh8"]
  state, sh, fz, b = _place(mesh, runs["init"], frozen, batch, init)
  wrong = dict(b, tokens=jax.device_put(batch["tokens"], mesh_lib.replicated(mesh)))
  with pytest.raises(ValueError, match="sharding"):
    loop.jit_step(step, mesh, sh, b, fz)(state, wrong, jax.random.key(5), fz)


def test_bad_layouts_name_the_sizes(setup):
  with pytest.raises(ValueError, match=r"8 devices are not divisible by the fixed sizes' product 3"):
    _mesh((3, -1, 1), 8)
  with pytest.raises(ValueError, match=r"needs 4 devices but 8 are available"):
    _mesh((1, 4, 1), 8)
  message = r"batch_size=6 is not divisible by the data-parallel size 4 \(mesh data=1 x fsdp=4\)"
  with pytest.raises(ValueError, match=message):
    mesh_lib.check_batch_size(6, _mesh((1, 4, 1), 4))
  # A real UNet weight on an fsdp axis of 3: no dimension of the tiny UNet's
  # 32/64-channel kernels divides by 3.
  init, _ = _pieces(setup)
  abstract = jax.eval_shape(init, jax.random.key(0))
  message = r"params/\S+ of shape \(\d.*\) has no dimension divisible by the fsdp axis size 3"
  with pytest.raises(partitioning.PartitionError, match=message):
    partitioning.state_shardings(abstract, _mesh((1, 3, 1), 3), fsdp_min_size=FSDP_MIN)
  # A rule naming an axis the weight cannot take is skipped, then FSDP places it.
  mesh = _mesh((1, 4, 1), 4)
  rules = ((r"w/kernel", ("fsdp", None, None)),)
  assert partitioning.spec_for("w/kernel", (6, 64, 64), mesh, fsdp_min_size=1, rules=rules) == P(None, "fsdp", None)
