"""Stage 2: the latent diffusion train state and the jitted train step.

One step: latents of the batch (a fresh posterior sample for KL first
stages, or cached moments), condition dropout for classifier-free guidance,
``t`` (uniform or logit-normal), ``z_t = q_sample(z, t, ε)``, the loss of the configured
parameterisation, gradients (accumulated over micro-batches in a
``lax.scan`` when asked), optimiser update and EMA. Metrics stay on device.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from ldm_jax.assembly import LDMStepConfig
from ldm_jax.diffusion.losses import diffusion_loss, loss_by_timestep_bucket, sample_timesteps
from ldm_jax.diffusion.parameterization import q_sample
from ldm_jax.diffusion.schedules import DiffusionSchedule
from ldm_jax.models.autoencoder import DiagonalGaussian
from ldm_jax.models.latent_diffusion import LatentDiffusion, random_inpaint_masks
from ldm_jax.nn.lora import LoRAConfig, init_adapters
from ldm_jax.training.ema import ema_update
from ldm_jax.training.loop import global_norm
from ldm_jax.training.lora import model_params
from ldm_jax.training.state import TrainState


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


def draw_randomness(model: LatentDiffusion, cfg: LDMStepConfig, rng: jax.Array, batch: dict, T: int) -> dict:
  """Every random draw of a step, per example, for the whole batch at once.

  Drawing before splitting into micro-batches makes gradient accumulation
  (and any other batch split) give the same result as one big batch.
  """
  if "latent_mean" in batch:
    latent_shape = batch["latent_mean"].shape
  else:
    b, h, w, _ = batch["image"].shape
    f = model.downsample_factor
    latent_shape = (b, h // f, w // f, model.latent_channels)
  k_t, k_noise, k_z, k_drop, k_mask = jax.random.split(rng, 5)
  draws = {
      "t": sample_timesteps(k_t, latent_shape[0], T, cfg.timestep_sampling, cfg.timestep_loc, cfg.timestep_scale),
      "noise": jax.random.normal(k_noise, latent_shape),
      "posterior_noise": jax.random.normal(k_z, latent_shape),
      "drop": jax.random.bernoulli(k_drop, cfg.cond_dropout, (latent_shape[0],)),
  }
  if model.concat_kind == "inpaint" and "image" in batch and "mask" not in batch:  # else the data made the masks
    draws["inpaint_mask"] = random_inpaint_masks(k_mask, batch["image"].shape[:3])
  return draws


def null_context(model: LatentDiffusion, frozen: Any, context: jax.Array) -> jax.Array:
  """The frozen encoder's output for the empty caption, shaped (1, L, D) like ``context``'s rows."""
  null = model.null_inputs({model.cond_key: jnp.zeros((1, context.shape[1]), jnp.int32)})
  return model.cond_stage.encode(frozen["cond"], null[model.cond_key]).astype(context.dtype)


def latents_of(model: LatentDiffusion, batch: dict, frozen: Any, posterior_noise: jax.Array) -> jax.Array:
  """Scaled latents of the batch: a posterior sample (KL) or the pre-quantisation latent (VQ).

  Uses cached moments when the batch carries them, else encodes the images.
  """
  if "latent_mean" in batch:
    mean, logvar = batch["latent_mean"], batch.get("latent_logvar")
  else:
    out = model.first_stage.apply(frozen["first_stage"], batch["image"], method=model.first_stage.encode)
    mean, logvar = (out.mean, out.logvar) if isinstance(out, DiagonalGaussian) else (out, None)
  z = mean if logvar is None else mean + jnp.exp(0.5 * logvar) * posterior_noise
  return model.scale_factor * z


def make_train_step(
    model: LatentDiffusion, schedule: DiffusionSchedule, tx: optax.GradientTransformation, cfg: LDMStepConfig,
    lora: LoRAConfig | None = None,
):
  """``step(state, batch, rng, frozen) -> (state, metrics)`` for the shared loop.

  With ``lora``, ``state.params["lora"]`` are adapters of the frozen
  ``frozen["unet"]`` (see ``ldm_jax.training.lora``).
  """
  T = schedule.num_timesteps

  def loss_fn(trained, batch, draws, frozen, rng):
    params = model_params(trained, frozen, lora)
    z0 = latents_of(model, batch, frozen, draws["posterior_noise"])
    inputs = {k: v for k, v in batch.items() if k not in ("image", "latent_mean", "latent_logvar")}
    if "image" in batch:
      inputs = model.derive_inputs(inputs, batch["image"], draws.get("inpaint_mask"))
    if cfg.cond_dropout > 0:
      context = inputs.pop("context", None)
      inputs = model.drop_inputs(draws["drop"], inputs, drop_concat=cfg.drop_concat)
      if context is not None:  # precomputed text-encoder outputs: dropped rows get the empty caption's
        inputs["context"] = jnp.where(draws["drop"][:, None, None], null_context(model, frozen, context), context)
    cond = model.encode_cond(params, frozen, inputs, train=True)
    t, noise = draws["t"], draws["noise"]
    out = model.apply(params, q_sample(schedule, z0, t, noise), t, cond, train=True, rngs={"dropout": rng})
    loss_B = diffusion_loss(
        out, z0, noise, t, schedule, prediction_type=cfg.prediction_type, loss_type=cfg.loss_type,
        weighting=cfg.weighting,
    )
    return jnp.mean(loss_B), loss_B

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def gradients(params, batch, draws, frozen, rng):
    k = cfg.grad_accum_steps
    if k == 1:
      return grad_fn(params, batch, draws, frozen, rng)
    # Micro-batch i takes examples i, i+k, ...: each device keeps its own rows.
    split = lambda a: jnp.swapaxes(a.reshape(a.shape[0] // k, k, *a.shape[1:]), 0, 1)  # noqa: E731
    micro = jax.tree.map(split, (batch, draws))

    def body(acc, xs):
      (mb, md), key = xs
      (loss, loss_B), g = grad_fn(params, mb, md, frozen, key)
      return jax.tree.map(jnp.add, acc, (loss, g)), loss_B

    zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), loss_B = jax.lax.scan(body, zeros, (micro, jax.random.split(rng, k)))
    unsplit = jnp.swapaxes(loss_B, 0, 1).reshape(-1)  # back to the batch's example order
    return (loss / k, unsplit), jax.tree.map(lambda g: g / k, grads)

  def step(state: TrainState, batch: dict, rng: jax.Array, frozen: Any):
    k_draws, k_dropout = jax.random.split(rng)
    draws = draw_randomness(model, cfg, k_draws, batch, T)
    (loss, loss_B), grads = gradients(state.params, batch, draws, frozen, k_dropout)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step_no = state.step + 1
    ema = state.ema_params
    if ema is not None:
      ema = ema_update(ema, params, step_no, cfg.ema_decay)
    means, _ = loss_by_timestep_bucket(loss_B, draws["t"], T, cfg.num_buckets)
    metrics = {"loss": loss, "grad_norm": global_norm(grads)}
    metrics.update({f"loss_t{i * T // cfg.num_buckets:04d}": means[i] for i in range(cfg.num_buckets)})
    new = state.replace(step=step_no, params=params, opt_state=opt_state, ema_params=ema)
    return new, metrics

  return step


def make_init_fn(model: LatentDiffusion, tx, cfg: LDMStepConfig, example_inputs: dict, frozen: Any, latent_shape,
                 lora: LoRAConfig | None = None):
  """``init(rng[, unet]) -> TrainState`` (pure, so the loop can jit it sharded).

  ``unet``: the UNet's starting weights (fine-tuning), an argument so that
  they never become constants of the program; the EMA starts from them too.
  With ``lora``, fresh adapters of ``frozen["unet"]`` instead of a UNet.
  """
  cond_shapes = conditioning_shapes(model, example_inputs, frozen)

  def init(rng, unet=None):
    if lora is not None:
      k_enc, k_lora = jax.random.split(rng)
      params = encoder_params(model, k_enc, example_inputs)
      params["lora"] = init_adapters(frozen["unet"], lora, k_lora)
      return TrainState.create(params, tx, ema=cfg.ema_decay > 0)
    params = init_params(model, rng, example_inputs, cond_shapes, latent_shape)
    if unet is not None:  # the random UNet above is dead code then, removed by the compiler
      params["unet"] = jax.tree.map(lambda a, b: jnp.asarray(a, b.dtype), unet, params["unet"])
    return TrainState.create(params, tx, ema=cfg.ema_decay > 0)

  return init
