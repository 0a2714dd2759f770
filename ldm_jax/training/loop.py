"""The training loop shared by both stages.

What it owns: creating the state already sharded (or restoring it onto its
shardings, falling back past broken checkpoints), the jitted step with
donated state, metrics fetched from the device once per ``log_every`` steps
(never per step), the finiteness check (losses, gradient norm, and the
updated state itself) that runs before anything is saved, checkpoints with
the data-iterator state, periodic hooks (sample grids, evaluation), and
clean exit on preemption (SIGTERM) on every process at the same step.

The steady-state step (every step after this run's first) is dispatched
under ``jax.transfer_guard``: an implicit
host<->device copy there (a NumPy batch, an uncommitted array resharded per
step) would stall the host on every step, so it fails with ``HostTransferError``
instead. Checkpoints are written in the background (orbax async); the loop only
waits for one at the next save or the end of training.
"""

import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from ldm_jax.parallel import partitioning
from ldm_jax.parallel.distributed import compile_in_lockstep
from ldm_jax.parallel.mesh import batch_sharding, replicated
from ldm_jax.training import checkpoint as ckpt_lib
from ldm_jax.training.metrics_writer import MetricWriter

# Metric added to every step's: 1 when the updated state (params, EMA,
# optimiser moments) holds no NaN/Inf. Checked, never logged.
STATE_FINITE = "state_finite"
# Key of the step's float/bool scalar metrics, packed into one vector (see ``jit_step``).
PACKED = "_packed_scalars"


class NonFiniteLossError(FloatingPointError):
  """A loss term, the gradient norm or the train state became NaN or Inf; names the step."""


class HostTransferError(RuntimeError):
  """The steady-state step made an implicit host<->device transfer (see ``LoopConfig.transfer_guard``)."""


TRANSFER_GUARDS = ("allow", "log", "disallow")


@dataclasses.dataclass
class Hook:
  """``fn(step, state)`` every ``every`` steps, on every process."""

  every: int
  fn: Callable[[int, Any], dict | None]
  name: str = "hook"


@dataclasses.dataclass
class LoopConfig:
  num_steps: int
  log_every: int = 50
  checkpoint_every: int = 1000
  keep_checkpoints: int = 3
  global_batch_size: int = 1
  # Metrics checked for NaN/Inf at every flush; a bad value stops the run.
  loss_keys: Sequence[str] = ("loss",)
  fsdp_min_size: int = 2**16
  partition_rules: Sequence = ()
  progress_bar: bool = True
  # jax.transfer_guard level around each steady-state step's dispatch:
  # "disallow" turns a per-step implicit transfer into an error,
  # "log" only logs it, "allow" checks nothing.
  transfer_guard: str = "disallow"


@dataclasses.dataclass
class TrainResult:
  state: Any
  step: int
  preempted: bool
  last_metrics: dict


class _PreemptionWatch:
  """SIGTERM → stop. Multi-process runs use JAX's preemption sync service
  (which owns SIGTERM there) so that all processes stop at the same step."""

  def __init__(self, checkpointer: ckpt_lib.Checkpointer):
    self._ckpt = checkpointer
    self._flag = False
    self._multi = jax.process_count() > 1
    self._old = None
    if not self._multi:
      self._old = signal.signal(signal.SIGTERM, self._on_term)

  def _on_term(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint and stopping")
    self._flag = True

  def should_stop(self, step: int) -> bool:
    return self._flag or (self._multi and self._ckpt.reached_preemption(step))

  def close(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def create_sharded_state(init_fn: Callable[..., Any], rng: jax.Array, mesh: Mesh, cfg: LoopConfig,
                         init_args: tuple = ()):
  """``(abstract_state, shardings)``; the state itself is never materialised here."""
  abstract = jax.eval_shape(init_fn, rng, *init_args)
  shardings = partitioning.state_shardings(
      abstract, mesh, fsdp_min_size=cfg.fsdp_min_size, rules=cfg.partition_rules
  )
  return abstract, shardings


def jit_step(step_fn: Callable, mesh: Mesh, state_shardings: Any, batch: dict, frozen: Any = None) -> Callable:
  """``jit(step)(state, batch, base_rng, frozen)``: the rng is folded with the
  step, the state donated, and every argument's layout pinned.

  Its float and bool scalar metrics come back packed in one float32 vector
  (``unpack_metrics(fetched, jitted.metric_names)`` names them again).

  ``in_shardings`` fix the layout the step is compiled for (state by the
  partition rules, batch split over the data-parallel axes, frozen weights
  where they already are): an argument placed otherwise fails loudly
  instead of being resharded every step.
  """

  names: list[str] = []  # of the packed metrics, in order; filled when the step is traced

  def folded_step(state, batch, base_rng, frozen):
    state, metrics = step_fn(state, batch, jax.random.fold_in(base_rng, state.step), frozen)
    # The loss is computed before the update, so it cannot vouch for the state being saved.
    metrics = {**metrics, STATE_FINITE: ckpt_lib.all_finite(state)}
    # Float and bool scalars travel as one vector: one device-to-host copy per step at the flush, not one each.
    names[:] = sorted(k for k, v in metrics.items() if jnp.ndim(v) == 0 and not jnp.issubdtype(
        jnp.result_type(v), jnp.integer))
    packed = jnp.stack([jnp.asarray(metrics.pop(k), jnp.float32) for k in names])
    return state, {**metrics, PACKED: packed}

  batch_shardings = jax.tree.map(lambda a: batch_sharding(mesh, np.ndim(a)), batch)
  frozen_shardings = None if frozen is None else jax.tree.map(lambda a: a.sharding, frozen)
  jitted = jax.jit(
      folded_step,
      in_shardings=(state_shardings, batch_shardings, replicated(mesh), frozen_shardings),
      out_shardings=(state_shardings, replicated(mesh)),
      donate_argnums=(0,),
  )
  jitted.metric_names = names
  return jitted


def unpack_metrics(metrics: dict, names: Sequence[str]) -> dict:
  """A fetched metrics dict of ``jit_step``'s with its packed scalars back under their names (as floats)."""
  metrics = dict(metrics)
  return {**dict(zip(names, np.asarray(metrics.pop(PACKED)).tolist())), **metrics}


def _nanmean(values) -> float:
  """Mean over steps that had a value (per-bucket losses are NaN when empty)."""
  values = np.asarray(values, np.float64)
  finite = values[~np.isnan(values)]
  return float(finite.mean()) if finite.size else float("nan")


def _check_finite(history: list[tuple[int, dict]], keys: Sequence[str], last_good: int | None, ckpt_dir: str):
  where = f"step {last_good} in {ckpt_dir}" if last_good is not None else "none was written"
  for step, metrics in history:
    for k in (*keys, "grad_norm"):
      if k in metrics and not np.isfinite(metrics[k]):
        what = "the gradient norm" if k == "grad_norm" else f"loss term {k!r}"
        raise NonFiniteLossError(
            f"{what} is {metrics[k]} at step {step}; stopping. The last good checkpoint is kept untouched ({where})."
        )
    if not metrics.get(STATE_FINITE, True):
      raise NonFiniteLossError(
          f"the train state holds NaN or Inf after the update of step {step} (its loss was finite: is the "
          f"learning rate too high?); stopping. The last good checkpoint is kept untouched ({where})."
      )


def data_counters(data_iterator: Any) -> dict[str, float]:
  """Cumulative counts of the input pipeline (``data/skipped``, ...), summed over processes."""
  counters = getattr(data_iterator, "counters", None)
  if counters is None:  # e.g. a latent cache's plain grain iterator
    return {}
  counts = counters()
  if jax.process_count() > 1:  # every process flushes at the same steps
    totals = multihost_utils.process_allgather(np.asarray(list(counts.values()), np.int64)).sum(axis=0)
    counts = dict(zip(counts, totals.tolist()))
  return counts


def _guarded_step(level: str, step: int, jitted: Callable, state: Any, batches: Iterator[dict], rng: jax.Array,
                  frozen: Any) -> tuple[Any, dict]:
  """Fetches the next batch, then dispatches ``jitted`` under ``jax.transfer_guard(level)``.

  The fetch stays outside the guard: it is the input pipeline's own, explicit
  placement (in a multi-process job ``make_array_from_process_local_data``,
  which the guard would count); a batch left on the host still trips the
  guard when the step is called with it.
  """
  batch = next(batches)
  try:
    with jax.transfer_guard(level):
      return jitted(state, batch, rng, frozen)
  except jax.errors.JaxRuntimeError as error:
    message = str(error)
    if "Disallowed" not in message:
      raise
    what = message[message.index("Disallowed"):].split(", dst_sharding")[0]
    raise HostTransferError(
        f"step {step}: an implicit transfer in the steady-state training step ({what}), which would stall the "
        "host on every step. Yield batches already on the device (jax.device_put or ldm_jax.data.to_global_array "
        "onto the batch sharding) and keep other step arguments on their shardings; "
        "LoopConfig.transfer_guard='allow' turns this check off."
    ) from error


def train_loop(
    *,
    workdir: str,
    mesh: Mesh,
    cfg: LoopConfig,
    init_fn: Callable[..., Any],
    step_fn: Callable[[Any, dict, jax.Array, Any], tuple[Any, dict]],
    init_args: tuple = (),
    batches: Iterator[dict],
    frozen: Any = None,
    data_iterator: Any = None,
    rng: jax.Array,
    hooks: Sequence[Hook] = (),
    meta: dict | Callable[[Any], dict] | None = None,
    writer: MetricWriter | None = None,
) -> TrainResult:
  """Runs (or resumes) training until ``cfg.num_steps``.

  Args:
    init_fn: ``(rng, *init_args) -> state`` (pure; jitted here with sharded outputs).
    init_args: arrays the first state is made from (pretrained weights):
      arguments of the jitted ``init_fn``, never constants of its program.
    step_fn: ``(state, batch, rng, frozen) -> (state, metrics)``; ``rng`` is
      already folded with the step. ``state`` must have an integer ``step``
      field.
    frozen: weights the step reads but does not train (a first stage, a
      frozen text encoder). Passed as an argument, laid out by the same
      rules as the state, never baked into the program as constants.
    batches: yields global (mesh-sharded) batches.
    data_iterator: the grain iterator behind ``batches``, checkpointed with
      the state; ``None`` for synthetic data.
    meta: JSON-able metadata stored with every checkpoint (config, ...), or a
      function of the state that computes it at save time (e.g. a latent
      scale factor that must match the saved weights).
  """
  if cfg.transfer_guard not in TRANSFER_GUARDS:
    raise ValueError(f"LoopConfig.transfer_guard must be one of {TRANSFER_GUARDS}, got {cfg.transfer_guard!r}.")
  writer = writer or MetricWriter(workdir)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=cfg.keep_checkpoints)
  init_rng, step_rng = jax.random.split(rng)
  # Committed to the step's layout once: an uncommitted key would be copied to every device on every step.
  # (A jitted identity, not device_put: in a multi-process job the mesh spans devices this process cannot address.)
  step_rng = jax.jit(lambda key: key, out_shardings=replicated(mesh))(step_rng)
  abstract, shardings = create_sharded_state(init_fn, init_rng, mesh, cfg, init_args)

  restored = checkpointer.restore_newest(
      ckpt_lib.abstract_with_shardings(abstract, shardings), data_iterator=data_iterator
  )
  latest = None
  if restored is not None:
    latest, state = restored
    logging.info("resumed from step %d", latest)
  else:
    init = jax.jit(init_fn, out_shardings=shardings)
    compile_in_lockstep(init, init_rng, *init_args, name="init")
    state = init(init_rng, *init_args)
  start = int(jax.device_get(state.step))
  writer.resume_at(start)  # steps after it were logged by a run that died before its next checkpoint

  if frozen is not None:
    frozen = jax.device_put(frozen, partitioning.state_shardings(
        frozen, mesh, fsdp_min_size=cfg.fsdp_min_size, rules=cfg.partition_rules))

  jitted = None

  watch = _PreemptionWatch(checkpointer)
  pending: list[tuple[int, dict]] = []
  last_good, last_metrics, preempted = latest, {}, False
  t_last, steps_since = time.perf_counter(), 0
  bar = None
  if cfg.progress_bar and jax.process_index() == 0:
    from tqdm import tqdm

    bar = tqdm(total=cfg.num_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)

  def flush(step: int):
    nonlocal pending, t_last, steps_since, last_metrics
    if not pending:
      return
    history = [(s, unpack_metrics(m, jitted.metric_names)) for s, m in jax.device_get(pending)]
    pending = []
    _check_finite(history, cfg.loss_keys, last_good, checkpointer.directory)
    elapsed = time.perf_counter() - t_last
    mean = {k: _nanmean([m[k] for _, m in history]) for k in history[-1][1] if k != STATE_FINITE}
    mean["images_per_sec"] = steps_since * cfg.global_batch_size / max(elapsed, 1e-9)
    mean.update(data_counters(data_iterator))
    last_metrics = mean
    writer.scalars(step, mean, echo=bar is None)
    if bar is not None:
      bar.set_postfix({k: f"{mean[k]:.4g}" for k in cfg.loss_keys if k in mean})
    t_last, steps_since = time.perf_counter(), 0

  def save(step: int, force: bool = False):
    nonlocal last_good
    flush(step)  # never save a state whose losses were not checked
    step_meta = meta(state) if callable(meta) else meta
    if checkpointer.save(step, state, data_iterator=data_iterator, meta=step_meta, force=force):
      last_good = step

  try:
    step = start
    while step < cfg.num_steps:
      if jitted is None:  # the first step: compiles, and may place things for the first time
        batch = next(batches)
        jitted = jit_step(step_fn, mesh, shardings, batch, frozen)
        compile_in_lockstep(jitted, state, batch, step_rng, frozen, name="train_step")
        state, metrics = jitted(state, batch, step_rng, frozen)
      else:
        state, metrics = _guarded_step(cfg.transfer_guard, step + 1, jitted, state, batches, step_rng, frozen)
      step += 1
      steps_since += 1
      pending.append((step, metrics))
      if bar is not None:
        bar.update(1)
      if step % cfg.log_every == 0 or step == cfg.num_steps:
        flush(step)
      if step % cfg.checkpoint_every == 0 or step == cfg.num_steps:
        save(step)
      for hook in hooks:
        if step % hook.every == 0 or step == cfg.num_steps:
          flush(step)
          out = hook.fn(step, state)
          if out:
            writer.scalars(step, out)
      checkpointer.check()  # a failed background save stops the run now, not one save later
      if watch.should_stop(step) and step < cfg.num_steps:
        save(step, force=True)
        preempted = True
        logging.warning("preempted: checkpoint %d saved; run the same command to resume", step)
        break
    checkpointer.wait()
  finally:
    watch.close()
    if bar is not None:
      bar.close()
    checkpointer.close()
  return TrainResult(state=state, step=step, preempted=preempted, last_metrics=last_metrics)


def global_norm(tree: Any) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
