"""Checkpoints a run can always come back to (issue 31, items 1, 3, 4, 10), on the toy loop of ``toy_training``:
a state blown up by its update is never saved, broken checkpoints are moved aside and an older one resumed, a
save that fails stops the run at once with one error, and the metrics log holds each step once after a resume."""

import errno
import glob
import json
import os
import shutil
import subprocess
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import toy_training as toy

from ldm_jax.training import checkpoint as ckpt_lib
from ldm_jax.training import loop


@pytest.fixture(scope="module")
def mesh():
  return toy.two_device_mesh()


def _finite(tree) -> bool:
  return all(np.isfinite(x).all() for x in jax.tree.leaves(tree))


def test_a_state_blown_up_by_its_update_is_never_saved(tmp_path, mesh):
  # Step 6's loss is finite (computed before the update); the weights it saves are not.
  with pytest.raises(loop.NonFiniteLossError, match=r"NaN or Inf after the update of step 6.*\(step 5 in "):
    toy.run(tmp_path, 12, mesh, checkpoint_every=1, keep=2, blow_up_at=6)
  assert ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [4, 5]
  assert _finite(toy.restored_params(tmp_path, 5))


def test_broken_checkpoints_are_moved_aside_and_an_intact_one_resumed(tmp_path, mesh, caplog):
  full = toy.run(tmp_path / "full", 16, mesh, checkpoint_every=3, keep=4)
  toy.run(tmp_path / "run", 12, mesh, checkpoint_every=3, keep=4)  # checkpoints 3, 6, 9, 12
  ckpts = tmp_path / "run" / "checkpoints"
  truncated = sorted(glob.glob(str(ckpts / "12" / "state" / "**" / "d" / "*"), recursive=True))
  for path in truncated:
    os.truncate(path, os.path.getsize(path) // 2)
  os.remove(ckpts / "9" / "state" / "manifest.ocdbt")
  os.remove(ckpts / "6" / "data" / "process_0-of-1.json")  # the data iterator's state

  resumed = toy.run(tmp_path / "run", 16, mesh, checkpoint_every=3, keep=4)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(full.state), jax.device_get(resumed.state))
  assert {"12.corrupt-1", "9.corrupt-1", "6.corrupt-1"} <= set(os.listdir(ckpts))  # kept for inspection
  log = caplog.text
  assert f"cannot restore checkpoint 12: {ckpts / '12' / 'state'}" in log
  assert "process_0-of-1.json" in log and "resuming from checkpoint 3 instead" in log


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
  """A folder on a 1 MiB tmpfs where mounting one is allowed; elsewhere a folder where
  checkpoint metadata over 1 MiB fails to write as on a full disk."""
  folder = tmp_path / "small"
  folder.mkdir()
  mounted = os.geteuid() == 0 and subprocess.run(
      ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True).returncode == 0
  if not mounted:
    save_fn = ocp.JsonCheckpointHandler._save_fn

    async def full_disk_save_fn(self, item, directory):
      if len(json.dumps(item)) > 2**20:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata"))
      await save_fn(self, item, directory)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", full_disk_save_fn)
  yield folder
  if mounted:
    subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_failed_save_stops_the_run_at_once_with_one_error(small_disk, mesh):
  seen = []

  def after_step(step, state):
    seen.append(step)
    # Waits for the background save, so that "at once" means this step rather than whenever it ends.
    for thread in threading.enumerate():
      if thread.name == "save_finalize":
        threading.Thread.join(thread)  # the plain join: orbax's own would raise the save's error here

  def meta(state):  # checkpoint 8 does not fit on the disk
    return {"padding": "x" * 2 * 2**20} if int(state.step) == 8 else {"note": "toy"}

  with pytest.raises(ckpt_lib.CheckpointWriteError) as error:
    toy.run(small_disk, 40, mesh, meta=meta, hooks=[loop.Hook(1, after_step)])
  message = str(error.value)
  assert "\n" not in message
  assert f"could not write checkpoint 8 to {small_disk / 'checkpoints'}" in message
  assert "No space left on device" in message and "iB free there; checkpoint 4 (" in message
  assert seen[-1] == 8  # not one save later
  assert not glob.glob(str(small_disk / "checkpoints" / "8*"))  # no partial folder left behind
  assert ckpt_lib.Checkpointer(str(small_disk / "checkpoints")).all_steps() == [4]
  assert _finite(toy.restored_params(small_disk, 4))


def test_the_metrics_log_holds_each_step_once_after_a_resume(tmp_path, mesh):
  toy.run(tmp_path, 10, mesh)  # logs steps 2, 4, ..., 10; checkpoints 4, 8, 10
  shutil.rmtree(tmp_path / "checkpoints" / "10")  # killed before checkpoint 10 was written ...
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 12, "lo')  # ... and while writing a line
  toy.run(tmp_path, 12, mesh)  # resumes from 8: replays 9 and 10
  with open(tmp_path / "metrics.jsonl") as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == [2, 4, 6, 8, 10, 12]
