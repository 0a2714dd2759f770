"""What the training loop itself costs per step, on a model too small to hide it.

    python -m benchmarks.loop_overhead [--steps 2000] [--repeats 3] [--out benchmarks/results/loop_overhead.json]

Runs ``ldm_jax.training.loop.train_loop`` on a one-layer regression (one device; the batch is put on the
device once and yielded every step, so input costs nothing) and times its steady-state steps from the
moments it asks for its batches. Then it calls the same compiled step (``loop.jit_step``) in a bare Python
for-loop. The difference per step is what the loop adds: the metrics kept for the flush every
``log_every`` steps (and the flush itself), the transfer guard, the progress bar, the check on background
saves. Variants switch off the progress bar and the guard to show what each costs. Last, one checkpoint of
``--save-mb`` MB: how long ``Checkpointer.save`` blocks the loop against how long the write takes.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.compilation import enable_persistent_cache
from benchmarks.machine import machine_info
from benchmarks.report import write_json
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.training import checkpoint as ckpt_lib
from ldm_jax.training import loop
from ldm_jax.training.state import TrainState

D_IN, D_OUT, BATCH = 16, 8, 8
TX = optax.sgd(1e-3)
# (name, LoopConfig fields): the default loop first.
VARIANTS: tuple[tuple[str, dict], ...] = (
    ("loop (defaults: progress bar, transfer guard)", {}),
    ("loop, no progress bar", {"progress_bar": False}),
    ("loop, no progress bar, no transfer guard", {"progress_bar": False, "transfer_guard": "allow"}),
)


def init(rng: jax.Array) -> TrainState:
  return TrainState.create({"kernel": jax.random.normal(rng, (D_IN, D_OUT)) * 0.1}, TX)


def step_fn(state: TrainState, batch: dict, rng: jax.Array, frozen: Any) -> tuple[TrainState, dict]:
  def loss_fn(params):
    return jnp.mean(jnp.square(batch["x"] @ params["kernel"] - batch["y"]))

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = TX.update(grads, state.opt_state, state.params)
  new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)
  return new, {"loss": loss, "grad_norm": loop.global_norm(grads)}


def _batch(mesh) -> dict:
  rng = np.random.default_rng(0)
  x = rng.normal(size=(BATCH, D_IN)).astype(np.float32)
  y = rng.normal(size=(BATCH, D_OUT)).astype(np.float32)
  return jax.device_put({"x": x, "y": y}, mesh_lib.batch_sharding(mesh, 2))


def time_loop(mesh, batch: dict, steps: int, fields: dict, workdir: str) -> tuple[float, float]:
  """Wall and CPU seconds per steady-state step of ``train_loop`` (steps 2 to ``steps - 1``: the first
  compiles)."""
  asked = []

  def batches():
    while True:
      # process_time is a system call (tens of microseconds in some VMs): read it only where the window ends.
      asked.append((time.perf_counter(), time.process_time() if len(asked) in (1, steps - 1) else 0.0))
      yield batch

  cfg = loop.LoopConfig(num_steps=steps, checkpoint_every=10 * steps, global_batch_size=BATCH, **fields)
  loop.train_loop(workdir=workdir, mesh=mesh, cfg=cfg, init_fn=init, step_fn=step_fn, batches=batches(),
                  rng=jax.random.key(0))
  # Batch k is asked for once step k - 1 is dispatched and booked: asks 2..steps span steps 2..steps-1.
  return tuple((asked[steps - 1][i] - asked[1][i]) / (steps - 2) for i in (0, 1))


def time_bare(mesh, batch: dict, steps: int) -> tuple[float, float]:
  """Wall and CPU seconds per call of the loop's compiled step in a plain for-loop (same program, same
  arguments)."""
  rng = jax.random.key(0)
  abstract, shardings = loop.create_sharded_state(init, rng, mesh, loop.LoopConfig(num_steps=steps))
  state = jax.jit(init, out_shardings=shardings)(rng)
  jitted = loop.jit_step(step_fn, mesh, shardings, batch)
  rng = jax.device_put(rng, mesh_lib.replicated(mesh))
  state, metrics = jitted(state, batch, rng, None)
  jax.block_until_ready(metrics)
  start, cpu_start = time.perf_counter(), time.process_time()
  for _ in range(steps - 2):
    state, metrics = jitted(state, batch, rng, None)
  jax.block_until_ready((state, metrics))
  return (time.perf_counter() - start) / (steps - 2), (time.process_time() - cpu_start) / (steps - 2)


def time_saves(mesh, megabytes: float, saves: int, directory: str) -> list[dict[str, float]]:
  """Per save of a ``megabytes`` state: seconds ``Checkpointer.save`` blocked, and seconds until on disk."""
  n = max(1, int(megabytes * 2**20 / 4 / 4))  # four float32 arrays
  sharding = mesh_lib.replicated(mesh)
  state = {f"w{i}": jax.device_put(np.random.default_rng(i).normal(size=(n,)).astype(np.float32), sharding)
           for i in range(4)}
  checkpointer = ckpt_lib.Checkpointer(directory, max_to_keep=2)
  rows = []
  try:
    for step in range(1, saves + 1):
      start = time.perf_counter()
      checkpointer.save(step, state)
      blocked = time.perf_counter() - start
      checkpointer.wait()
      rows.append(dict(blocked_s=blocked, on_disk_s=time.perf_counter() - start))
  finally:
    checkpointer.close()
  return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(prog="python -m benchmarks.loop_overhead", description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=2000, help="training steps per timed run (at least 10)")
  p.add_argument("--repeats", type=int, default=3, help="timed runs per variant (the median is reported)")
  p.add_argument("--save-mb", type=float, default=64.0, help="size of the state of the save timing")
  p.add_argument("--saves", type=int, default=3, help="saves timed")
  p.add_argument("--out", default=None, help="JSON results file")
  args = p.parse_args(argv)
  if args.steps < 10 or args.repeats < 1:
    p.error(f"--steps must be >= 10 and --repeats >= 1, got {args.steps} and {args.repeats}")
  mesh = mesh_lib.make_mesh(mesh_lib.default_mesh_config(), devices=jax.devices()[:1])
  batch = _batch(mesh)
  report = dict(machine=machine_info(sys.argv[1:] if argv is None else argv, module="benchmarks.loop_overhead"),
                settings=dict(steps=args.steps, repeats=args.repeats, batch=BATCH, model=f"dense {D_IN}->{D_OUT}",
                              log_every=loop.LoopConfig(num_steps=1).log_every, save_mb=args.save_mb))
  times: dict[str, list[tuple[float, float]]] = {"bare": []}
  with tempfile.TemporaryDirectory(prefix="ldm_jax_loop_overhead_") as scratch:
    enable_persistent_cache(os.path.join(scratch, "xla_cache"))  # each run's step is the same program: compile once
    # Untimed: one-time costs (imports, TensorBoard's first write, the compile that fills the cache).
    time_loop(mesh, batch, 10, {**VARIANTS[0][1], "log_every": 5}, os.path.join(scratch, "warmup"))
    for r in range(args.repeats):  # interleaved, so that a load change on the machine hits every variant
      times["bare"].append(time_bare(mesh, batch, args.steps))
      for i, (name, fields) in enumerate(VARIANTS):
        times.setdefault(name, []).append(
            time_loop(mesh, batch, args.steps, fields, os.path.join(scratch, f"run_{r}_{i}")))
    saves = time_saves(mesh, args.save_mb, args.saves, os.path.join(scratch, "saves"))
  bare, bare_cpu = (statistics.median(t[i] for t in times["bare"]) for i in (0, 1))
  rows = []
  for name, pairs in times.items():
    wall, cpu = (statistics.median(t[i] for t in pairs) for i in (0, 1))
    rows.append(dict(name=name, steps_per_s=1 / wall, us_per_step=1e6 * wall, overhead_us_per_step=1e6 * (wall - bare),
                     cpu_us_per_step=1e6 * cpu, cpu_overhead_us_per_step=1e6 * (cpu - bare_cpu),
                     times_s=[t[0] for t in pairs], cpu_times_s=[t[1] for t in pairs]))
  report.update(results=rows, saves=saves, load_average_end=os.getloadavg())
  print("| run | steps/s | us per step | loop overhead, us per step | CPU us per step | CPU overhead, us per step |")
  print("|---|---|---|---|---|---|")
  for row in rows:
    print(f"| {row['name']} | {row['steps_per_s']:.0f} | {row['us_per_step']:.0f} | "
          f"{row['overhead_us_per_step']:.0f} | {row['cpu_us_per_step']:.0f} | {row['cpu_overhead_us_per_step']:.0f} |")
  for i, save in enumerate(saves, start=1):
    print(f"save {i} of {args.save_mb:g} MB: blocked {1e3 * save['blocked_s']:.0f} ms, "
          f"on disk after {1e3 * save['on_disk_s']:.0f} ms")
  write_json(args.out, report)
  return report


if __name__ == "__main__":
  main()
