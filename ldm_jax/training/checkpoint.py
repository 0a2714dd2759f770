"""Checkpoints with orbax: train state, data-iterator state and metadata.

One ``CheckpointManager`` per run directory holds, per step:

- ``state``: the train state pytree, saved asynchronously by every process
  (each writes its own shards) and restored directly onto the target
  shardings;
- ``data``: the grain iterator state of every process (one file each), so a
  resumed run continues with exactly the next example;
- ``meta``: JSON written by process 0 (config, latent scale factor, ...).

Before restoring, the stored tree is compared with the model's: a checkpoint
of the wrong shape fails with one error naming every mismatched array. A
checkpoint that cannot be read (truncated file, missing manifest or iterator
state) or holds NaN/Inf is moved aside (``<step>.corrupt-<n>``) and the
previous one restored instead. A save that fails in the background (disk
full) is reported as one ``CheckpointWriteError`` saying where and how much
space is free; its partial folder is removed and older checkpoints stay.
"""

import glob
import logging
import os
import re
import shutil
import threading
import time
from typing import Any, NoReturn

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


class CheckpointMismatchError(ValueError):
  """A checkpoint whose arrays do not fit the model being restored."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (e.g. the disk is full); older ones are intact."""


class NoUsableCheckpointError(RuntimeError):
  """Every checkpoint of a run failed to restore (each was moved aside)."""


def all_finite(tree: Any) -> jax.Array:
  """One boolean: no floating-point leaf of ``tree`` holds NaN or Inf (traceable)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.asarray(True)


_all_finite_jit = jax.jit(all_finite)


def _root_cause(error: BaseException) -> str:
  """The innermost error of a chain, in one line (orbax wraps the OSError that says "disk full")."""
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  line = (str(error).strip().splitlines() or [""])[0]
  line = line.split(" [tensorstore_spec=")[0]  # a page of JSON that says nothing more
  return f"{type(error).__name__}: {line[:400]}"


def _size(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _human(num_bytes: int) -> str:
  for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
    if num_bytes >= size:
      return f"{num_bytes / size:.1f} {unit}"
  return f"{num_bytes / 2**10:.0f} KiB"


def _join_orbax_writers(timeout_s: float = 60.0) -> None:
  """Waits for orbax's writer threads: the first failed write ends a save, while
  the others go on writing into its partial folder (and would recreate it)."""
  deadline = time.monotonic() + timeout_s
  for thread in threading.enumerate():
    if type(thread).__name__ == "_SignalingThread" and thread is not threading.current_thread():
      threading.Thread.join(thread, max(0.0, deadline - time.monotonic()))  # the plain join: orbax's re-raises


class _ShortOrbaxErrors(logging.Filter):
  """Drops the tracebacks from orbax's own error logs: a failed save logs one
  per array and thread (hundreds), burying the one error we raise for it."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname:
      record.exc_info, record.exc_text = None, None
    return True


_SHORT_ORBAX_ERRORS = _ShortOrbaxErrors()


def _flat(tree) -> dict[str, Any]:
  return {
      "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path): leaf
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def mismatch_lines(abstract: Any, stored: Any) -> list[str]:
  """Every array missing from ``stored``, extra in it, or of another shape."""
  want, have = _flat(abstract), _flat(stored)
  problems = [f"missing in checkpoint: {k} {tuple(want[k].shape)}" for k in want if k not in have]
  problems += [f"not in the model: {k} {tuple(have[k].shape)}" for k in have if k not in want]
  problems += [
      f"{k}: checkpoint {tuple(have[k].shape)} vs model {tuple(want[k].shape)}"
      for k in want
      if k in have and tuple(have[k].shape) != tuple(want[k].shape)
  ]
  return problems


def _whole_replicas_on_cpu() -> None:
  """Saves each replicated CPU array from one replica, unsliced.

  Orbax's replica-parallel saving splits a replicated array between its
  replicas, which on CPU costs one compiled slice per (shape, device) for no
  gain: host memory is what it copies to anyway (about 250 compiles, 20 s, for
  the first save of a small model on 8 devices). Orbax already does this on GPU.
  """
  if jax.default_backend() != "cpu":
    return
  current = ocp.type_handlers.get_type_handler(jax.Array)
  if getattr(current, "_use_replica_parallel", False):
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # orbax warns about the (intended) override
    try:
      ocp.type_handlers.register_type_handler(
          jax.Array,
          ocp.type_handlers.ArrayHandler(
              use_replica_parallel=False, array_metadata_store=getattr(current, "_array_metadata_store", None)
          ),
          override=True,
      )
    finally:
      absl_logger.setLevel(level)


def saved_steps(directory: str) -> list[int]:
  """Steps of the checkpoint folders under ``directory``, without opening them ([] if there is none).

  Unfinished saves (orbax's temporary folders) and checkpoints moved aside
  as corrupt do not count.
  """
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


class Checkpointer:
  """Saves and restores a run's checkpoints under ``directory``."""

  def __init__(self, directory: str, *, max_to_keep: int | None = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self._in_flight: int | None = None  # the step of a save that may still be running
    _whole_replicas_on_cpu()
    logging.getLogger("absl").addFilter(_SHORT_ORBAX_ERRORS)  # orbax logs through absl; adding twice is a no-op
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=True,  # partial folders of a killed run
        ),
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        },
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, *, data_iterator=None, meta: dict | None = None, force: bool = False) -> bool:
    """Starts saving ``state`` at ``step`` (async); returns whether it saved.

    Only finite states should be saved (the loop checks first): old
    checkpoints are rotated out by age alone, so the newest must be usable.
    """
    self.wait()  # orbax waits for the previous save anyway; this way its failure is reported as its own
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if meta is not None:
      items["meta"] = ocp.args.JsonSave(meta)
    try:
      saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as error:
      self._write_failed(step, error)
    if saved:
      self._in_flight = step
      logging.info("saving checkpoint %d to %s", step, self.directory)
    return saved

  def check(self) -> None:
    """Raises ``CheckpointWriteError`` now if the last async save has failed (cheap; call every step).

    Multi-process runs learn of it at the next save instead: processes would
    see the background save end at different steps and stop out of step.
    """
    if self._in_flight is not None and jax.process_count() == 1 and not self._manager.is_saving_in_progress():
      self.wait()

  def _write_failed(self, step: int, error: Exception) -> NoReturn:
    _join_orbax_writers()
    if jax.process_index() == 0:
      for partial in glob.glob(os.path.join(glob.escape(self.directory), f"{step}.orbax-checkpoint-tmp*")):
        shutil.rmtree(partial, ignore_errors=True)
    self._manager.reload()
    older = [s for s in self.all_steps() if s < step]
    free = shutil.disk_usage(self.directory).free
    if older:
      kept = f"checkpoint {older[-1]} ({_human(_size(os.path.join(self.directory, str(older[-1]))))}) is intact"
    else:
      kept = "there is no earlier checkpoint"
    raise CheckpointWriteError(
        f"could not write checkpoint {step} to {self.directory}: {_root_cause(error)}. "
        f"{_human(free)} free there; {kept}. Its partial folder was removed: free some space (or lower "
        "train.keep_checkpoints) and run the same command to resume."
    ) from None

  def reached_preemption(self, step: int) -> bool:
    """True on every process once any process was told to stop (multi-host safe)."""
    return self._manager.reached_preemption(step)

  def _check_shapes(self, step: int, abstract_state: Any) -> None:
    stored = self._manager.item_metadata(step).get("state")
    if stored is None:  # not another model's checkpoint: a broken one
      raise FileNotFoundError(f"checkpoint {step} in {self.directory} has no readable state metadata")
    problems = mismatch_lines(abstract_state, stored)
    if problems:
      shown = "\n  ".join(problems[:25]) + (f"\n  ... and {len(problems) - 25} more" if len(problems) > 25 else "")
      raise CheckpointMismatchError(
          f"checkpoint {step} in {self.directory} does not match the model "
          f"(was it written with another config?):\n  {shown}"
      )

  def restore_newest(self, abstract_state: Any, *, data_iterator=None) -> tuple[int, Any] | None:
    """``(step, state)`` of the newest checkpoint that restores to a finite state; None without any.

    Newer ones that fail (unreadable, or NaN/Inf) are then moved aside as
    ``<step>.corrupt-<n>``, never deleted. When none restores, all stay in
    place: the cause may be the run's setup rather than the files. A
    checkpoint of another model's shape is an error, not a fallback.
    """
    failures = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, _ = self.restore(step, abstract_state, data_iterator=data_iterator)
        if not bool(_all_finite_jit(state)):
          raise FloatingPointError("its state holds NaN or Inf")
      except CheckpointMismatchError:
        raise
      except Exception as error:  # Any reader failure means this checkpoint is unusable.
        failures.append((step, f"checkpoint {step}: {self._culprit(step, error)}: {_root_cause(error)}"))
        logging.error("cannot restore %s", failures[-1][1])
        continue
      for broken, _ in failures:
        self._move_aside(broken)
      if failures:
        logging.warning("resuming from checkpoint %d instead", step)
      return step, state
    if failures:
      raise NoUsableCheckpointError(f"no checkpoint in {self.directory} restores ({'; '.join(f for _, f in failures)})")
    return None

  def _culprit(self, step: int, error: Exception) -> str:
    """The most specific path inside checkpoint ``step`` that ``error`` names (else the checkpoint's folder)."""
    step_dir = os.path.join(self.directory, str(step))
    paths = [p for p in re.findall(r"/[^\s\"'\]\[,;]+", str(error)) if (p + os.sep).startswith(step_dir + os.sep)]
    return max(paths, key=len) if paths else step_dir

  def _move_aside(self, step: int) -> None:
    """Renames checkpoint ``step`` to ``<step>.corrupt-<n>``."""
    n = 1
    while os.path.exists(os.path.join(self.directory, f"{step}.corrupt-{n}")):
      n += 1
    aside = os.path.join(self.directory, f"{step}.corrupt-{n}")
    if jax.process_index() == 0:
      os.rename(os.path.join(self.directory, str(step)), aside)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
    self._manager.reload()
    logging.warning("moved the broken checkpoint %d aside to %s", step, aside)

  def restore(self, step: int, abstract_state: Any, *, data_iterator=None) -> tuple[Any, dict | None]:
    """Restores ``(state, meta)``; ``abstract_state`` leaves carry shardings."""
    self._check_shapes(step, abstract_state)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    stored_items = self._manager.item_metadata(step)
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    if stored_items.get("meta") is not None:
      items["meta"] = ocp.args.JsonRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    logging.info("restored checkpoint %d from %s", step, self.directory)
    return restored["state"], restored.get("meta") if "meta" in items else None

  def read_meta(self, step: int | None = None) -> dict | None:
    """The JSON metadata of a checkpoint (latest by default), without the state."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def wait(self) -> None:
    """Blocks until pending async saves are on disk; raises ``CheckpointWriteError`` if one failed."""
    step, self._in_flight = self._in_flight, None
    try:
      self._manager.wait_until_finished()
    except Exception as error:
      if step is None:
        raise
      self._write_failed(step, error)

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._manager.close()


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
  """``ShapeDtypeStruct`` leaves that carry the target shardings."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
  )


def nest(path: tuple[str, ...], leaf: Any) -> dict:
  """``leaf`` placed at ``path`` in otherwise empty dicts: ``nest(("a", "b"), x) == {"a": {"b": x}}``."""
  for key in reversed(path):
    leaf = {key: leaf}
  return leaf


def restore_subtree(
    directory: str, step: int, path: tuple[str, ...], abstract: Any, sharding: jax.sharding.Sharding, *, what: str
) -> Any:
  """Only ``state[path[0]][path[1]]...`` of checkpoint ``step`` in ``directory``.

  ``abstract`` gives the subtree's structure and shapes; every other array of
  the checkpoint (optimiser moments, a discriminator, ...) stays on disk, so
  reading a model's weights for sampling needs memory for the weights alone.
  A subtree of another shape fails with one error naming every mismatched
  array (``what`` says whose arrays they are).
  """
  manager = ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(create=False),
      # All of a step's items, so orbax does not warn about the ones left unread.
      item_handlers={
          "state": ocp.PyTreeCheckpointHandler(),
          "data": grain.checkpoint.CheckpointHandler(),
          "meta": ocp.JsonCheckpointHandler(),
      },
  )
  try:
    stored = manager.item_metadata(step)["state"]
    stored = getattr(stored, "tree", stored)
    for key in path:
      stored = stored[key]
    problems = mismatch_lines(abstract, stored)
    if problems:
      raise CheckpointMismatchError(
          f"{what} in checkpoint {step} of {directory} does not match the model config "
          f"({len(problems)} arrays):\n  " + "\n  ".join(problems)
      )
    target = nest(path, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract))
    restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding), target)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
        ),
    )["state"]
  finally:
    manager.close()
  for key in path:
    restored = restored[key]
  return restored
