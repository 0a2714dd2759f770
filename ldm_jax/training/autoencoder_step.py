"""Stage 1: the autoencoder train state and the jitted train step.

One step updates the generator (encoder, decoder, codebook; optionally the
loss's ``logvar``) and the PatchGAN discriminator on the same batch, each
with its own Adam, as the reference's two Lightning optimisers do. The
discriminator enters through ``lax.cond`` on the traced step: before
``disc_start`` it is neither evaluated nor updated, from ``disc_start`` on it
is, without recompiling. (The reference also runs it before ``disc_start``,
with a zero factor; the only visible difference is that its Adam step count
and BatchNorm statistics start moving at ``disc_start`` here.)

Deviation kept on purpose: the discriminator sees the reconstructions of
this step's generator forward (before the generator update) instead of a
second autoencoder forward with the updated weights.
"""

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from ldm_jax.evaluation.image_metrics import psnr
from ldm_jax.models.autoencoder import AutoencoderKL
from ldm_jax.models.discriminator import NLayerDiscriminator
from ldm_jax.models.lpips import make_lpips_fn
from ldm_jax.models.vq import VQModel
from ldm_jax.training.autoencoder_loss import (
    Stage1LossConfig,
    discriminator_loss,
    forward_with_last_layer_vjp,
    kl_generator_loss,
    vq_generator_loss,
)
from ldm_jax.training.loop import global_norm

FirstStage = AutoencoderKL | VQModel
StepFn = Callable[[Any, dict, jax.Array, Any], tuple[Any, dict]]
# What the loop checks for NaN/Inf before every checkpoint.
LOSS_KEYS = ("total", "rec", "d_loss")


@flax.struct.dataclass
class Stage1State:
  """Generator params ``{"ae": autoencoder params, "logvar": scalar}`` and the
  discriminator's params, BatchNorm statistics and optimiser state."""

  step: jax.Array
  params: Any
  opt_state: Any
  disc_params: Any
  disc_batch_stats: Any
  disc_opt_state: Any


def gan_enabled(cfg: Stage1LossConfig) -> bool:
  """Whether the adversarial term can ever matter (static: decides what is compiled)."""
  return cfg.disc_factor > 0 and cfg.disc_weight > 0


def generator_tx(tx: optax.GradientTransformation, train_logvar: bool) -> optax.GradientTransformation:
  """``tx`` on the autoencoder; ``logvar`` frozen unless asked (the reference's
  AutoencoderKL optimiser leaves it out, so it stays at ``logvar_init``)."""
  labels = {"ae": "train", "logvar": "train" if train_logvar else "frozen"}
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def autoencode(model: FirstStage, ae_params: Any, x_BxHxWxC: jax.Array, rng: jax.Array, *, train: bool) -> tuple:
  """``(x̂, posterior)`` (KL, a posterior sample decoded) or ``(x̂, codebook
  loss, quantiser info)`` (VQ)."""
  k_post, k_drop = jax.random.split(rng)
  kw = dict(deterministic=not train, rngs={"dropout": k_drop})
  if isinstance(model, AutoencoderKL):
    return model.apply({"params": ae_params}, x_BxHxWxC, rng=k_post, **kw)
  return model.apply({"params": ae_params}, x_BxHxWxC, **kw)


def random_crop(images_BxHxWxC: jax.Array, size: int, rng: jax.Array) -> jax.Array:
  """An independent random ``size`` x ``size`` window of each image.

  Done in the step (keyed by the step's rng) so that a resumed run crops
  exactly as an uninterrupted one.
  """
  b, h, w, c = images_BxHxWxC.shape
  if size > min(h, w):
    raise ValueError(f"train.crop_size {size} is larger than the {h}x{w} training images")
  k_top, k_left = jax.random.split(rng)
  tops = jax.random.randint(k_top, (b,), 0, h - size + 1)
  lefts = jax.random.randint(k_left, (b,), 0, w - size + 1)
  crop = lambda im, t, l: jax.lax.dynamic_slice(im, (t, l, 0), (size, size, c))  # noqa: E731
  return jax.vmap(crop)(images_BxHxWxC, tops, lefts)


def make_init_fn(
    model: FirstStage,
    disc: NLayerDiscriminator,
    tx: optax.GradientTransformation,
    disc_tx: optax.GradientTransformation,
    loss_cfg: Stage1LossConfig,
    example_images: jax.Array,
) -> Callable[[jax.Array], Stage1State]:
  """``init(rng) -> Stage1State`` (pure). ``example_images`` are real training
  images: the discriminator's ActNorm (when used) initialises from them."""

  def init(rng: jax.Array) -> Stage1State:
    k_ae, k_disc = jax.random.split(rng)
    f = model.downsample_factor  # the smallest input: parameter shapes do not depend on it
    x = jnp.zeros((1, f, f, example_images.shape[-1]), jnp.float32)
    ae_params = _init_ae(model, k_ae, x, loss_cfg.posterior_logvar_init)
    disc_vars = disc.init(k_disc, jnp.asarray(example_images), train=True)
    params = {"ae": ae_params, "logvar": jnp.asarray(loss_cfg.logvar_init, jnp.float32)}
    return Stage1State(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        disc_params=disc_vars["params"],
        disc_batch_stats=disc_vars.get("batch_stats", {}),
        disc_opt_state=disc_tx.init(disc_vars["params"]),
    )

  return init


def _init_ae(model: FirstStage, rng: jax.Array, x: jax.Array, posterior_logvar_init: float = 0.0) -> Any:
  if not isinstance(model, AutoencoderKL):
    return model.init(rng, x)["params"]
  params = model.init(rng, x, sample_posterior=False)["params"]
  if posterior_logvar_init:
    # quant_conv's outputs are (mean, logvar) channel halves: start the posterior
    # at std exp(init / 2) rather than 1, so the decoder sees signal from step 0.
    bias = params["quant_conv"]["bias"]
    logvar_bias = jnp.full((model.embed_dim,), posterior_logvar_init, bias.dtype)
    params["quant_conv"]["bias"] = bias.at[model.embed_dim:].set(logvar_bias)
  return params


def make_train_step(
    model: FirstStage,
    disc: NLayerDiscriminator,
    loss_cfg: Stage1LossConfig,
    tx: optax.GradientTransformation,
    disc_tx: optax.GradientTransformation,
    *,
    crop_size: int = 0,
) -> StepFn:
  """``step(state, batch, rng, frozen) -> (state, metrics)`` for the shared loop.

  ``frozen`` is ``{"lpips": params}`` when the perceptual loss is on, else
  ``None``. ``crop_size > 0`` trains on random crops of that size.
  """
  use_gan = gan_enabled(loss_cfg)
  is_kl = isinstance(model, AutoencoderKL)

  def disc_apply(params, batch_stats, images):
    logits, updates = disc.apply(
        {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"]
    )
    return logits, updates.get("batch_stats", batch_stats)

  def generator_loss(params, x, step, rng, lpips_fn, disc_params, batch_stats):
    fwd = lambda p: autoencode(model, p, x, rng, train=True)  # noqa: E731
    x_rec, rest, last_vjp = forward_with_last_layer_vjp(fwd, params["ae"])

    def loss_with(logits_fn, pullback):
      common = dict(x=x, x_rec=x_rec, step=step, logits_fake_fn=logits_fn, lpips_fn=lpips_fn, last_layer_vjp=pullback)
      if is_kl:
        return kl_generator_loss(loss_cfg, posterior=rest[0], logvar=params["logvar"], **common)
      return vq_generator_loss(loss_cfg, codebook_loss=rest[0], quantizer_info=rest[1], **common)

    def without_gan():
      loss, (metrics, _) = loss_with(None, None)
      return loss, metrics, batch_stats

    def with_gan():
      loss, (metrics, new_stats) = loss_with(lambda img: disc_apply(disc_params, batch_stats, img), last_vjp)
      return loss, metrics, new_stats

    if use_gan:
      loss, metrics, new_stats = jax.lax.cond(step >= loss_cfg.disc_start, with_gan, without_gan)
    else:
      loss, metrics, new_stats = without_gan()
    return loss, (metrics, new_stats, x_rec)

  def disc_update(state, batch_stats, x, x_rec):
    def d_loss_fn(d_params):
      logits_real, stats = disc_apply(d_params, batch_stats, x)
      logits_fake, stats = disc_apply(d_params, stats, jax.lax.stop_gradient(x_rec))
      d_loss, d_metrics = discriminator_loss(loss_cfg, logits_real, logits_fake, state.step)
      return d_loss, (d_metrics, stats)

    def update():
      (_, (d_metrics, stats)), grads = jax.value_and_grad(d_loss_fn, has_aux=True)(state.disc_params)
      updates, opt_state = disc_tx.update(grads, state.disc_opt_state, state.disc_params)
      return optax.apply_updates(state.disc_params, updates), stats, opt_state, d_metrics

    def skip():
      zero = jnp.zeros((), jnp.float32)
      metrics = {"disc_loss": zero, "logits_real": zero, "logits_fake": zero}
      return state.disc_params, batch_stats, state.disc_opt_state, metrics

    if not use_gan:
      return skip()
    return jax.lax.cond(state.step >= loss_cfg.disc_start, update, skip)

  def step(state: Stage1State, batch: dict, rng: jax.Array, frozen: Any) -> tuple[Stage1State, dict]:
    k_crop, k_ae = jax.random.split(rng)
    x = batch["image"].astype(jnp.float32)
    if crop_size:
      x = random_crop(x, crop_size, k_crop)
    lpips_fn = make_lpips_fn(frozen["lpips"]) if frozen and "lpips" in frozen else None
    grad_fn = jax.value_and_grad(generator_loss, has_aux=True)
    (_, (metrics, batch_stats, x_rec)), grads = grad_fn(
        state.params, x, state.step, k_ae, lpips_fn, state.disc_params, state.disc_batch_stats
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    disc_params, batch_stats, disc_opt_state, d_metrics = disc_update(state, batch_stats, x, x_rec)

    metrics = dict(metrics, **d_metrics)
    metrics["d_loss"] = metrics.pop("disc_loss")
    if lpips_fn is None:
      metrics.pop("lpips")
    metrics["psnr"] = jnp.mean(psnr(x, jnp.clip(x_rec, -1.0, 1.0)))
    metrics["grad_norm"] = global_norm(grads["ae"])
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        disc_params=disc_params,
        disc_batch_stats=batch_stats,
        disc_opt_state=disc_opt_state,
    )
    return new_state, metrics

  return step
