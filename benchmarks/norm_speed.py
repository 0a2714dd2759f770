"""How much the hand-written GroupNorm(+SiLU) backward saves on the demo's networks.

Times forward + backward of the demo autoencoder's loss (16 crops of 32 px,
``configs/autoencoder.py:demo``) and of the demo UNet (batch 16, 16x16x3
latents, ``configs/ldm.py:shapes_txt2img``), once with ``ldm_jax.nn.norm``'s
custom-VJP GroupNorm and once with the same formula left to autodiff (what
``flax.linen.GroupNorm`` followed by ``nn.silu`` computes). Prints the median
of ``--repeats`` calls per variant::

    python -m benchmarks.norm_speed [--repeats 20] [--out results.json]

Each variant is compiled in its own process, so neither sees the other's
caches; the figures are wall time on whatever CPU or accelerator JAX finds.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NETWORKS = ("autoencoder", "unet")
VARIANTS = ("custom_vjp", "autodiff")


def autodiff_group_norm(x, scale, bias, num_groups, epsilon, silu=False):
  """The plain two-pass GroupNorm formula, differentiated by JAX."""
  import jax
  import jax.numpy as jnp

  groups = x.reshape(x.shape[0], -1, num_groups, x.shape[-1] // num_groups)
  mean = groups.mean((1, 3), keepdims=True)
  var = jnp.square(groups - mean).mean((1, 3), keepdims=True)
  y = ((groups - mean) * jax.lax.rsqrt(var + epsilon)).reshape(x.shape) * scale + bias
  return jax.nn.silu(y) if silu else y


def _programs(network: str):
  """(jitted loss-and-grad, its arguments) for one demo network."""
  import jax
  import jax.numpy as jnp

  from ldm_jax.config import load_config
  from ldm_jax.models.build import build_unet
  from ldm_jax.models.first_stage import make_first_stage

  batch = 16
  keys = jax.random.split(jax.random.key(0), 4)
  if network == "autoencoder":
    config = load_config(os.path.join(ROOT, "configs/autoencoder.py:demo"))
    model = make_first_stage(config.model)
    crop = config.train.crop_size
    x = jax.random.uniform(keys[0], (batch, crop, crop, 3), minval=-1.0, maxval=1.0)
    params = model.init(keys[1], x, sample_posterior=False)

    def loss(p, x):
      reconstruction, posterior = model.apply(p, x, rng=keys[2])
      return jnp.mean(jnp.square(reconstruction - x)) + 1e-4 * jnp.mean(posterior.kl())

    return jax.jit(jax.value_and_grad(loss)), (params, x)
  config = load_config(os.path.join(ROOT, "configs/ldm.py:shapes_txt2img"))
  model = build_unet(config.unet)
  size, channels = config.unet.image_size, config.unet.in_channels
  x = jax.random.normal(keys[0], (batch, size, size, channels))
  t = jax.random.randint(keys[1], (batch,), 0, 1000)
  context = jax.random.normal(keys[2], (batch, config.cond_stage.max_seq_len, config.unet.context_dim))
  params = model.init(keys[3], x, t, context)

  def loss(p, x, t, context):
    return jnp.mean(jnp.square(model.apply(p, x, t, context) - x))

  return jax.jit(jax.value_and_grad(loss)), (params, x, t, context)


def measure(network: str, variant: str, repeats: int) -> float:
  """Median seconds of one forward + backward call in this process."""
  import jax

  import ldm_jax.nn.norm as norm

  if variant == "autodiff":
    norm.group_norm = autodiff_group_norm
  step, args = _programs(network)
  compiled = step.lower(*args).compile()
  for _ in range(3):
    jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--out", default="", help="also write the figures to this JSON file")
  parser.add_argument("--one", nargs=2, metavar=("NETWORK", "VARIANT"), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.one:  # a child process: one measurement, printed as JSON
    print(json.dumps(measure(*args.one, args.repeats)))
    return {}
  results = {}
  for network in NETWORKS:
    for variant in VARIANTS:
      out = subprocess.run(
          [sys.executable, "-m", "benchmarks.norm_speed", "--one", network, variant, "--repeats", str(args.repeats)],
          cwd=ROOT, check=True, capture_output=True, text=True,
      ).stdout
      results[f"{network}/{variant}"] = seconds = json.loads(out.strip().splitlines()[-1])
      print(f"{network:12s} {variant:11s} {seconds * 1e3:7.1f} ms per forward + backward (batch 16)", flush=True)
    speedup = results[f"{network}/autodiff"] / results[f"{network}/custom_vjp"]
    print(f"{network:12s} speed-up    {speedup:.2f}x", flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)
  return results


if __name__ == "__main__":
  main()
