"""Memory and scaling report of a UNet train step on a device mesh.

For a UNet preset and a list of mesh sizes it prints, per device: parameter,
optimiser-state and EMA bytes (from the partition rules), the compiled step's
memory (``memory_analysis()`` of the lowered executable: arguments, outputs,
temporaries) and the FLOPs of one step (``cost_analysis()``). Nothing of
model size is allocated: the state is a tree of ``ShapeDtypeStruct`` and the
step is only lowered and compiled.

  nice -n 10 python benchmarks/memory_report.py --preset sd_v1 --latent 64 \
      --devices 1,2,4,8 --batch_per_device 1 --remat none,full --fake_devices 8

The step is the stage-2 UNet objective on precomputed latents and text
context (the frozen first stage and text encoder are left out: they do not
train and are not part of the sharded state): eps-prediction L2 loss, AdamW,
EMA. Meshes are pure FSDP, ``(data, fsdp, tensor) = (1, N, 1)``.

``--lora RANK`` reports LoRA fine-tuning instead (``configs/sd_finetune.py:
sd15,lora``): the UNet is a frozen argument laid out by the same rules, the
state holds only the attention adapters, their Adam moments and EMA.

  nice -n 10 python benchmarks/memory_report.py --preset sd_v1 --latent 64 \
      --devices 1,8,32 --batch_per_device 1 --remat none --fake_devices 32 --lora 4
"""

import argparse
import os
import sys
import time


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="sd_v1", help="UNet preset (ldm_jax.models.unet.UNET_PRESETS)")
  p.add_argument("--latent", type=int, default=64, help="latent side (64 = 512x512 images with a KL-f8)")
  p.add_argument("--devices", default="1,2,4,8", help="comma-separated mesh sizes")
  p.add_argument("--batch_per_device", type=int, default=1)
  p.add_argument("--remat", default="none,full", help="comma-separated remat policies")
  p.add_argument("--compute_dtype", default="bfloat16")
  p.add_argument("--context_len", type=int, default=77)
  p.add_argument("--no_ema", action="store_true")
  p.add_argument("--fake_devices", type=int, default=0, help="CPU devices to fake (0: use the real ones)")
  p.add_argument("--markdown", action="store_true", help="print a markdown table")
  p.add_argument("--skip_compile", action="store_true", help="state bytes only (no lowering/compiling)")
  p.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
  p.add_argument("--json", default="", help="also write the rows to this JSON file")
  return p.parse_args(argv)


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f}"


def main(argv=None) -> None:
  args = _parse(argv)
  if args.fake_devices:
    # Only buffer assignment and cost analysis matter here: skip LLVM's
    # optimisation of the CPU code, which is most of the compile time.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  import jax

  if args.fake_devices:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.fake_devices)
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from ldm_jax.diffusion.parameterization import q_sample
  from ldm_jax.diffusion.schedules import make_schedule
  from ldm_jax.models.unet import UNetModel, unet_preset
  from ldm_jax.nn.lora import LoRAConfig, apply_adapters, init_adapters
  from ldm_jax.parallel import mesh as mesh_lib
  from ldm_jax.parallel import partitioning
  from ldm_jax.training.ema import ema_update
  from ldm_jax.training.state import TrainState

  schedule = make_schedule("linear", 1000, 0.00085, 0.012)
  tx = optax.adamw(1e-4, weight_decay=0.01)
  rows = []
  for n in [int(s) for s in args.devices.split(",")]:
    cfg = mesh_lib.default_mesh_config()
    cfg.shape = (1, n, 1)
    mesh = mesh_lib.make_mesh(cfg, devices=jax.devices()[:n])
    batch = args.batch_per_device * n
    for remat in args.remat.split(","):
      fields = unet_preset(args.preset, remat_policy=remat)
      unet = UNetModel(**fields, dtype=jnp.dtype(args.compute_dtype))
      c_in, side = fields["in_channels"], args.latent
      z = jax.ShapeDtypeStruct((batch, side, side, c_in), jnp.float32)
      ctx = None
      if fields.get("context_dim"):
        ctx = jax.ShapeDtypeStruct((batch, args.context_len, fields["context_dim"]), jnp.float32)

      def unet_init(rng):
        return unet.init(rng, jnp.zeros((1, side, side, c_in)), jnp.zeros((1,), jnp.int32),
                         None if ctx is None else jnp.zeros((1, *ctx.shape[1:])))

      lora = LoRAConfig(rank=args.lora, alpha=float(args.lora)) if args.lora else None
      key = jax.eval_shape(lambda: jax.random.key(0))
      base = jax.eval_shape(unet_init, key) if lora else None

      def init(rng):
        params = init_adapters(base, lora, rng) if lora else unet_init(rng)
        return TrainState.create(params, tx, ema=not args.no_ema)

      abstract = jax.eval_shape(init, key)
      shardings = partitioning.state_shardings(abstract, mesh)
      base_shardings = partitioning.state_shardings(base, mesh) if lora else None

      def step(state, z0, context, rng, frozen_unet=None):
        k_t, k_n, k_d = jax.random.split(rng, 3)
        t = jax.random.randint(k_t, (z0.shape[0],), 0, schedule.num_timesteps)
        noise = jax.random.normal(k_n, z0.shape)

        def loss_fn(params):
          weights = apply_adapters(frozen_unet, params, lora) if lora else params
          out = unet.apply(weights, q_sample(schedule, z0, t, noise), t, context, train=True, rngs={"dropout": k_d})
          return jnp.mean(jnp.square(out.astype(jnp.float32) - noise))

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = None if state.ema_params is None else ema_update(state.ema_params, params, state.step + 1, 0.9999)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema), loss

      repl = NamedSharding(mesh, P())
      in_sh = (shardings, mesh_lib.batch_sharding(mesh, 4), None if ctx is None else mesh_lib.batch_sharding(mesh, 3),
               repl, base_shardings)
      jitted = jax.jit(step, in_shardings=in_sh, out_shardings=(shardings, repl), donate_argnums=(0,))

      def bytes_per_device(tree, tree_shardings) -> int:
        return sum(int(np.prod(s.shard_shape(a.shape))) * a.dtype.itemsize
                   for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(tree_shardings)))

      counted = {name: bytes_per_device(getattr(abstract, name), getattr(shardings, name))
                 for name in ("params", "opt_state", "ema_params")}
      num_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract.params))
      frozen_b = bytes_per_device(base, base_shardings) if lora else 0
      nan = float("nan")
      args_b = temp_b = peak = flops = seconds = nan
      if not args.skip_compile:
        t0 = time.perf_counter()
        compiled = jitted.lower(abstract, z, ctx, key, base).compile()
        seconds = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops", nan)) if cost else nan
        args_b, temp_b = mem.argument_size_in_bytes, mem.temp_size_in_bytes
        # Donated state aliases the outputs: count it once.
        peak = args_b + mem.output_size_in_bytes - mem.alias_size_in_bytes + temp_b
      rows.append(dict(
          devices=n, remat=remat, mode=f"lora r{args.lora}" if lora else "full", batch=batch, params=num_params,
          frozen_b=frozen_b, param_b=counted["params"],
          opt_b=counted["opt_state"], ema_b=counted["ema_params"], args_b=args_b,
          temp_b=temp_b, peak_b=peak, flops=flops, compile_s=seconds,
      ))
      _print_row(rows[-1], args.markdown, header=len(rows) == 1)
      sys.stdout.flush()
  if args.json:
    import json

    with open(args.json, "w") as f:
      json.dump(dict(preset=args.preset, latent=args.latent, compute_dtype=args.compute_dtype, rows=rows), f, indent=1)


_COLS = ("devices", "mode", "remat", "global batch", "trained (M)", "frozen UNet GiB/dev", "trained GiB/dev",
         "adam GiB/dev", "EMA GiB/dev",
         "arguments GiB/dev", "temporaries GiB/dev", "peak GiB/dev", "TFLOP/step/dev", "compile s")


def _print_row(r: dict, markdown: bool, header: bool) -> None:
  vals = (r["devices"], r["mode"], r["remat"], r["batch"], f"{r['params'] / 1e6:.2f}", _gib(r["frozen_b"]),
          _gib(r["param_b"]), _gib(r["opt_b"]),
          _gib(r["ema_b"]), _gib(r["args_b"]), _gib(r["temp_b"]), _gib(r["peak_b"]), f"{r['flops'] / 1e12:.2f}",
          f"{r['compile_s']:.0f}")
  if markdown:
    if header:
      print("| " + " | ".join(_COLS) + " |")
      print("|" + "---|" * len(_COLS))
    print("| " + " | ".join(str(v) for v in vals) + " |")
  else:
    if header:
      print("  ".join(f"{c:>12s}" for c in _COLS))
    print("  ".join(f"{str(v):>12s}" for v in vals))


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main()
