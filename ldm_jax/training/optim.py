"""Optimisers and learning-rate schedules from ``config.optim``."""

import ml_collections
import optax


def default_optim_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      dict(
          name="adamw",  # adam | adamw
          learning_rate=1e-4,
          # The reference scales the base rate by the global batch size
          # (scale_lr): lr = learning_rate * batch * grad_accum_steps.
          scale_lr_by_batch=False,
          b1=0.9,
          b2=0.999,
          eps=1e-8,
          weight_decay=0.01,
          schedule="constant",  # constant | cosine | linear
          warmup_steps=0,
          grad_clip_norm=0.0,  # 0 disables clipping
      )
  )


def learning_rate(config: ml_collections.ConfigDict, total_steps: int, global_batch: int = 1) -> optax.Schedule:
  peak = config.learning_rate * (global_batch if config.get("scale_lr_by_batch", False) else 1)
  warmup = int(config.get("warmup_steps", 0))
  decay_steps = max(total_steps - warmup, 1)
  if config.schedule == "constant":
    after = optax.constant_schedule(peak)
  elif config.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, decay_steps)
  elif config.schedule == "linear":
    after = optax.linear_schedule(peak, 0.0, decay_steps)
  else:
    raise ValueError(f"optim.schedule must be constant, cosine or linear, got {config.schedule!r}")
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
