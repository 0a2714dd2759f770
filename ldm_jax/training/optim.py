"""Optimisers and learning-rate schedules from ``config.optim``."""

import jax.numpy as jnp
import ml_collections
import optax

# "lambda_*" are the reference's LambdaLR multipliers of learning_rate (CompVis ldm/lr_scheduler.py):
# LambdaLinearScheduler and LambdaWarmUpCosineScheduler, one cycle each.
LAMBDA_SCHEDULES = ("lambda_linear", "lambda_warmup_cosine")
LR_SCHEDULES = ("constant", "cosine", "linear", *LAMBDA_SCHEDULES)


def default_optim_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      dict(
          name="adamw",  # adam | adamw
          learning_rate=1e-4,
          # The reference's main.py --scale_lr: lr = learning_rate * train.batch_size (the global
          # batch of one optimizer step: devices x per-device batch x accumulated micro-batches).
          scale_lr_by_batch=False,
          b1=0.9,
          b2=0.999,
          eps=1e-8,
          weight_decay=0.01,
          schedule="constant",  # one of LR_SCHEDULES
          warmup_steps=0,
          # lambda_* schedules: the rate is learning_rate times a factor going linearly from f_start to
          # f_max over warmup_steps, then to f_min at cycle_length (linearly, or along a half cosine).
          f_start=1e-6,
          f_max=1.0,
          f_min=1.0,
          cycle_length=10**13,
          grad_clip_norm=0.0,  # 0 disables clipping
      )
  )


def lambda_multiplier(kind: str, warmup_steps: int, f_start: float, f_max: float, f_min: float,
                      cycle_length: float) -> optax.Schedule:
  """The reference's LambdaLR factor at optimizer step n (n = 0 at the first update), one cycle.

  ``lambda_linear`` is LambdaLinearScheduler, ``lambda_warmup_cosine`` LambdaWarmUpCosineScheduler
  (its lr_start, lr_max, lr_min, max_decay_steps are f_start, f_max, f_min, cycle_length).
  """
  if kind not in LAMBDA_SCHEDULES:
    raise ValueError(f"lambda_multiplier: kind must be one of {LAMBDA_SCHEDULES}, got {kind!r}")
  if warmup_steps < 1 or cycle_length <= warmup_steps:
    raise ValueError(f"optim.schedule={kind!r} needs 1 <= optim.warmup_steps < optim.cycle_length, "
                     f"got warmup_steps={warmup_steps}, cycle_length={cycle_length}")
  cycle_length = float(cycle_length)

  def factor(count):
    n = jnp.asarray(count, jnp.float32)
    warm = (f_max - f_start) / warmup_steps * n + f_start
    if kind == "lambda_linear":
      after = f_min + (f_max - f_min) * (cycle_length - n) / cycle_length
    else:
      t = jnp.minimum((n - warmup_steps) / (cycle_length - warmup_steps), 1.0)
      after = f_min + 0.5 * (f_max - f_min) * (1.0 + jnp.cos(t * jnp.pi))
    return jnp.where(n < warmup_steps, warm, after)

  return factor


def learning_rate(config: ml_collections.ConfigDict, total_steps: int, global_batch: int = 1) -> optax.Schedule:
  peak = config.learning_rate * (global_batch if config.get("scale_lr_by_batch", False) else 1)
  warmup = int(config.get("warmup_steps", 0))
  if config.schedule in LAMBDA_SCHEDULES:
    factor = lambda_multiplier(config.schedule, warmup, config.f_start, config.f_max, config.f_min,
                               config.cycle_length)
    return lambda count: peak * factor(count)
  decay_steps = max(total_steps - warmup, 1)
  if config.schedule == "constant":
    after = optax.constant_schedule(peak)
  elif config.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, decay_steps)
  elif config.schedule == "linear":
    after = optax.linear_schedule(peak, 0.0, decay_steps)
  else:
    raise ValueError(f"optim.schedule must be one of {LR_SCHEDULES}, got {config.schedule!r}")
  if not warmup:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(
    config: ml_collections.ConfigDict, total_steps: int, global_batch: int = 1
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimiser and its schedule (returned too, for logging the rate)."""
  schedule = learning_rate(config, total_steps, global_batch)
  if config.name == "adam":
    opt = optax.adam(schedule, b1=config.b1, b2=config.b2, eps=config.eps)
  elif config.name == "adamw":
    opt = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay)
  else:
    raise ValueError(f"optim.name must be adam or adamw, got {config.name!r}")
  if config.get("grad_clip_norm", 0.0):
    opt = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), opt)
  return opt, schedule
