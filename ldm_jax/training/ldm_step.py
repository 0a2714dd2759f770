"""Stage 2: the latent diffusion train state and the jitted train step.

One step: latents of the batch (a fresh posterior sample for KL first
stages, or cached moments), condition dropout for classifier-free guidance,
``t ~ U{0..T-1}``, ``z_t = q_sample(z, t, ε)``, the loss of the configured
parameterisation, gradients (accumulated over micro-batches in a
``lax.scan`` when asked), optimiser update and EMA. Metrics stay on device.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ldm_jax.diffusion.losses import diffusion_loss, loss_by_timestep_bucket, sample_timesteps
from ldm_jax.diffusion.parameterization import q_sample
from ldm_jax.diffusion.schedules import DiffusionSchedule
from ldm_jax.models.latent_diffusion import LatentDiffusion
from ldm_jax.training.ema import ema_update
from ldm_jax.training.loop import global_norm
from ldm_jax.training.state import TrainState


@dataclasses.dataclass(frozen=True)
class LDMStepConfig:
  prediction_type: str = "eps"
  loss_type: str = "l2"
  weighting: str = "none"  # none | min_snr
  cond_dropout: float = 0.0  # p of replacing the condition by the null one (CFG)
  drop_concat: bool = False  # whether CFG dropout also zeroes concat conditioning
  ema_decay: float = 0.9999  # 0 disables EMA
  grad_accum_steps: int = 1
  num_buckets: int = 10  # loss logged per timestep bucket


def encoder_params(model: LatentDiffusion, rng: jax.Array, inputs: dict) -> dict:
  """Fresh variables of the trainable conditioning encoders (cross-attn, concat)."""
  k_cond, k_concat = jax.random.split(rng)
  params: dict[str, Any] = {}
  if model.cond_key is not None and model.cond_stage.trainable:
    params["cond"] = model.cond_stage.module.init(k_cond, inputs[model.cond_key])
  if model.concat_kind in ("low_res", "segmentation") and model.concat_stage.trainable:
    source = inputs["low_res" if model.concat_kind == "low_res" else "segmentation_onehot"]
    params["concat"] = model.concat_stage.module.init(k_concat, source)
  return params


def conditioning_shapes(model: LatentDiffusion, inputs: dict, frozen: Any) -> dict:
  """Shapes of ``encode_cond``'s output, computed abstractly (nothing runs)."""
  return jax.eval_shape(lambda rng: model.encode_cond(encoder_params(model, rng, inputs), frozen, inputs),
                        jax.random.key(0))


def init_params(model: LatentDiffusion, rng: jax.Array, inputs: dict, cond_shapes: dict, latent_shape: tuple) -> dict:
  """Random UNet and trainable-encoder variables.

  ``cond_shapes`` (from :func:`conditioning_shapes`) gives the UNet's
  conditioning shapes, so initialisation never runs the frozen first stage.
  """
  k_unet, k_enc = jax.random.split(rng)
  params = encoder_params(model, k_enc, inputs)
  cond = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cond_shapes)
  z = jnp.zeros(latent_shape, jnp.float32)
  x = z if "concat" not in cond else jnp.concatenate([z, cond["concat"]], axis=-1)
  t = jnp.zeros((latent_shape[0],), jnp.int32)
  params["unet"] = model.unet.init(k_unet, x, t, cond.get("context"), cond.get("y"))
  return params


def latents_of(model: LatentDiffusion, batch: dict, frozen: Any, rng: jax.Array) -> jax.Array:
  """Scaled latents: from cached posterior moments when present, else encoded now."""
  if "latent_mean" in batch:
    z = batch["latent_mean"]
    if "latent_logvar" in batch:
      z = z + jnp.exp(0.5 * batch["latent_logvar"]) * jax.random.normal(rng, z.shape)
    return model.scale_factor * z
  return model.encode_images(frozen, batch["image"], rng)


def make_train_step(
    model: LatentDiffusion, schedule: DiffusionSchedule, tx: optax.GradientTransformation, cfg: LDMStepConfig
):
  """``step(state, batch, rng, frozen) -> (state, metrics)`` for the shared loop."""
  T = schedule.num_timesteps

  def loss_fn(params, batch, rng, frozen):
    k_z, k_drop, k_t, k_noise, k_derive, k_dropout = jax.random.split(rng, 6)
    z0 = latents_of(model, batch, frozen, k_z)
    inputs = {k: v for k, v in batch.items() if k not in ("image", "latent_mean", "latent_logvar")}
    if "image" in batch:
      inputs = model.derive_inputs(inputs, batch["image"], k_derive)
    inputs = model.drop_inputs(k_drop, inputs, cfg.cond_dropout, drop_concat=cfg.drop_concat)
    cond = model.encode_cond(params, frozen, inputs, train=True)
    t = sample_timesteps(k_t, z0.shape[0], T)
    noise = jax.random.normal(k_noise, z0.shape)
    z_t = q_sample(schedule, z0, t, noise)
    out = model.apply(params, z_t, t, cond, train=True, rngs={"dropout": k_dropout})
    loss_B = diffusion_loss(
        out, z0, noise, t, schedule, prediction_type=cfg.prediction_type, loss_type=cfg.loss_type,
        weighting=cfg.weighting,
    )
    return jnp.mean(loss_B), (loss_B, t)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def gradients(params, batch, rng, frozen):
    k = cfg.grad_accum_steps
    if k == 1:
      return grad_fn(params, batch, rng, frozen)
    # Micro-batch i takes examples i, i+k, ...: each device keeps its own rows.
    micro = jax.tree.map(lambda a: jnp.swapaxes(a.reshape(a.shape[0] // k, k, *a.shape[1:]), 0, 1), batch)

    def body(acc, xs):
      mb, key = xs
      (loss, aux), g = grad_fn(params, mb, key, frozen)
      return jax.tree.map(jnp.add, acc, (loss, g)), aux

    zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), (loss_B, t) = jax.lax.scan(body, zeros, (micro, jax.random.split(rng, k)))
    grads = jax.tree.map(lambda g: g / k, grads)
    return (loss / k, (loss_B.reshape(-1), t.reshape(-1))), grads

  def step(state: TrainState, batch: dict, rng: jax.Array, frozen: Any):
    (loss, (loss_B, t)), grads = gradients(state.params, batch, rng, frozen)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step_no = state.step + 1
    ema = state.ema_params
    if ema is not None:
      ema = ema_update(ema, params, step_no, cfg.ema_decay)
    means, _ = loss_by_timestep_bucket(loss_B, t, T, cfg.num_buckets)
    metrics = {"loss": loss, "grad_norm": global_norm(grads)}
    metrics.update({f"loss_t{i * T // cfg.num_buckets:04d}": means[i] for i in range(cfg.num_buckets)})
    new = state.replace(step=step_no, params=params, opt_state=opt_state, ema_params=ema)
    return new, metrics

  return step


def make_init_fn(model: LatentDiffusion, tx, cfg: LDMStepConfig, example_inputs: dict, frozen: Any, latent_shape):
  """``init(rng) -> TrainState`` (pure, so the loop can jit it sharded)."""
  cond_shapes = conditioning_shapes(model, example_inputs, frozen)

  def init(rng):
    params = init_params(model, rng, example_inputs, cond_shapes, latent_shape)
    return TrainState.create(params, tx, ema=cfg.ema_decay > 0)

  return init
