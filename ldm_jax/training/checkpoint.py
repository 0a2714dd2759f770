"""Checkpoints with orbax: train state, data-iterator state and metadata.

One ``CheckpointManager`` per run directory holds, per step:

- ``state``: the train state pytree, saved asynchronously by every process
  (each writes its own shards) and restored directly onto the target
  shardings;
- ``data``: the grain iterator state of every process (one file each), so a
  resumed run continues with exactly the next example;
- ``meta``: JSON written by process 0 (config, latent scale factor, ...).

Before restoring, the stored tree is compared with the model's: a checkpoint
of the wrong shape fails with one error naming every mismatched array.
"""

import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
  """A checkpoint whose arrays do not fit the model being restored."""


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


class Checkpointer:
  """Saves and restores a run's checkpoints under ``directory``."""

  def __init__(self, directory: str, *, max_to_keep: int | None = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    _whole_replicas_on_cpu()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
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
    """Starts saving ``state`` at ``step`` (async); returns whether it saved."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if meta is not None:
      items["meta"] = ocp.args.JsonSave(meta)
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      logging.info("saving checkpoint %d to %s", step, self.directory)
    return saved

  def reached_preemption(self, step: int) -> bool:
    """True on every process once any process was told to stop (multi-host safe)."""
    return self._manager.reached_preemption(step)

  def _check_shapes(self, step: int, abstract_state: Any) -> None:
    problems = mismatch_lines(abstract_state, self._manager.item_metadata(step)["state"])
    if problems:
      shown = "\n  ".join(problems[:25]) + (f"\n  ... and {len(problems) - 25} more" if len(problems) > 25 else "")
      raise CheckpointMismatchError(
          f"checkpoint {step} in {self.directory} does not match the model "
          f"(was it written with another config?):\n  {shown}"
      )

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
    """Blocks until pending async saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
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
