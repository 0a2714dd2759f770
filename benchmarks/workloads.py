"""Our side of each workload: a program to jit, its arguments, and how to count its work.

Parameters and inputs are random (drawn on the host); shapes follow
:class:`~benchmarks.settings.Settings`. Every workload feeds NHWC float32
inputs; the models compute in ``settings.dtype``.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.compilation import lowered_flops
from benchmarks.configs import CONTEXT_LENGTH, SD_LATENT_SCALE, unet_fields, vae_ddconfig
from benchmarks.settings import Settings
from ldm_jax.diffusion import (
    SamplerConfig,
    diffusion_loss,
    make_iteration,
    make_plan,
    make_schedule,
    q_sample,
    sample,
    sample_timesteps,
)
from ldm_jax.models.autoencoder import AutoencoderKL
from ldm_jax.models.unet import UNetModel
from ldm_jax.training.optim import default_optim_config, make_optimizer
from ldm_jax.training.state import TrainState

NUM_TIMESTEPS = 1000


@dataclasses.dataclass
class Workload:
  """One jitted program to benchmark.

  ``next_args(args, out)`` gives the next call's arguments when the program
  consumes (donates) its inputs; ``loop_flops`` adds work XLA's cost analysis
  does not see (the 2nd..Nth trip of a scan body).
  """

  name: str
  fn: Callable[..., Any]
  args: tuple[Any, ...]
  images: int
  donate_argnums: tuple[int, ...] = ()
  next_args: Callable[[tuple[Any, ...], Any], tuple[Any, ...]] | None = None
  loop_flops: Callable[[], float | None] | None = None


def sd_schedule():
  """Stable Diffusion's training schedule (LDM "linear" 0.00085 → 0.012, 1000 steps)."""
  return make_schedule("linear", NUM_TIMESTEPS, 0.00085, 0.012)


class Models:
  """Our UNet and VAE for ``settings``, their random parameters, and random inputs.

  ``abstract=True`` gives ``jax.ShapeDtypeStruct``s instead of arrays: enough
  to lower (and count the FLOPs of) full-size programs without allocating them.
  """

  def __init__(self, settings: Settings, abstract: bool = False):
    self.s, self.abstract = settings, abstract
    dtype = jnp.dtype(settings.dtype)
    self.unet = UNetModel(**unet_fields(
        settings.model, dtype=dtype, attention_impl=settings.attention_impl, remat_policy=settings.remat_policy,
    ))
    self.vae = AutoencoderKL(ddconfig=vae_ddconfig(settings.model), embed_dim=settings.model.latent_channels,
                             attention_impl=settings.attention_impl, dtype=dtype)
    # Random values come from NumPy on the host: jitted initialisers would cost
    # an XLA compilation each (tens of seconds for the UNet's on a CPU).
    self._rng = np.random.default_rng(settings.seed)
    self._unet_params = self._vae_params = None

  def build(self, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` computed (jitted), or only its shapes when abstract."""
    return jax.eval_shape(fn, *args) if self.abstract else jax.jit(fn)(*args)

  def _array(self, shape: tuple[int, ...], dtype: Any, draw: Callable[[], np.ndarray]) -> Any:
    return jax.ShapeDtypeStruct(shape, dtype) if self.abstract else jax.device_put(draw())

  def normal(self, *shape: int) -> jax.Array:
    return self._array(shape, jnp.float32, lambda: self._rng.standard_normal(shape, np.float32))

  def latents(self, batch: int) -> jax.Array:
    side = self.s.latent_size
    return self.normal(batch, side, side, self.s.model.latent_channels)

  def images(self, batch: int) -> jax.Array:
    return self.normal(batch, self.s.image_size, self.s.image_size, 3)

  def context(self, batch: int) -> jax.Array:
    return self.normal(batch, CONTEXT_LENGTH, self.s.model.context_dim)

  def timesteps(self, batch: int) -> jax.Array:
    return self._array((batch,), jnp.int32, lambda: self._rng.integers(0, NUM_TIMESTEPS, batch, np.int32))

  def _params(self, init: Callable[..., Any], *args: Any) -> Any:
    """Parameters of ``init``'s shapes: kernels N(0, 1/fan_in), norm scales 1, biases 0."""
    shapes = jax.eval_shape(init, jax.random.key(0), *(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args))
    if self.abstract:
      return shapes

    def leaf(path, x):
      name = getattr(path[-1], "key", None)
      if name == "kernel":
        fan_in = math.prod(x.shape[:-1])
        return jax.device_put(self._rng.standard_normal(x.shape, np.float32) / np.float32(math.sqrt(fan_in)))
      return jax.device_put(np.full(x.shape, 1.0 if name == "scale" else 0.0, x.dtype))

    return jax.tree_util.tree_map_with_path(leaf, shapes)

  @property
  def unet_params(self) -> Any:
    if self._unet_params is None:
      self._unet_params = self._params(self.unet.init, self.latents(1), self.timesteps(1), self.context(1))
    return self._unet_params

  def take_unet_params(self) -> Any:
    """The UNet parameters for a program that donates them; later users get fresh ones."""
    params, self._unet_params = self.unet_params, None
    return params

  def share_params(self, other: "Models", copy: bool = False) -> None:
    """Takes ``other``'s parameters instead of drawing new ones: parameter shapes do not depend on
    the batch, the compute dtype, remat or attention. ``copy`` (on device) for a program that donates them."""
    unet = other.unet_params
    self._unet_params = jax.tree.map(jnp.copy, unet) if copy else unet
    self._vae_params = other.vae_params

  @property
  def vae_params(self) -> Any:
    if self._vae_params is None:
      init = lambda key, x: self.vae.init(key, x, sample_posterior=False)  # noqa: E731
      self._vae_params = self._params(init, self.images(1))
    return self._vae_params


def unet_fwd(m: Models) -> Workload:
  b = m.s.batch
  return Workload("unet_fwd", m.unet.apply, (m.unet_params, m.latents(b), m.timesteps(b), m.context(b)), b)


def unet_train(m: Models) -> Workload:
  """eps-prediction loss, backward and AdamW (lr 1e-4, weight decay 0.01) on a donated TrainState."""
  tx, _ = make_optimizer(default_optim_config(), total_steps=1)
  schedule, model = sd_schedule(), m.unet

  def train_step(state: TrainState, z0, context, rng):
    t_key, noise_key = jax.random.split(jax.random.fold_in(rng, state.step))
    t_B = sample_timesteps(t_key, z0.shape[0], NUM_TIMESTEPS)
    noise = jax.random.normal(noise_key, z0.shape, jnp.float32)
    x_t = q_sample(schedule, z0, t_B, noise)

    def loss_fn(params):
      out = model.apply(params, x_t, t_B, context)
      return diffusion_loss(out, z0, noise, t_B, schedule, prediction_type="eps").mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), loss

  b = m.s.batch
  state = m.build(lambda params: TrainState.create(params, tx), m.take_unet_params())
  args = (state, m.latents(b), m.context(b), jax.random.key(m.s.seed))
  return Workload("unet_train", train_step, args, b, donate_argnums=(0,),
                  next_args=lambda args, out: (out[0], *args[1:]))


def vae_encode(m: Models) -> Workload:
  def encode(params, images):
    return m.vae.apply(params, images, method=AutoencoderKL.encode).mode()

  b = m.s.batch
  return Workload("vae_encode", encode, (m.vae_params, m.images(b)), b)


def vae_decode(m: Models) -> Workload:
  def decode(params, z):
    return m.vae.apply(params, z, method=AutoencoderKL.decode)

  b = m.s.batch
  return Workload("vae_decode", decode, (m.vae_params, m.latents(b)), b)


def sampler(m: Models) -> Workload:
  """``steps`` DDIM steps with classifier-free guidance (one UNet call on 2B per step), then decode."""
  config = SamplerConfig(sampler="ddim", num_steps=m.s.steps)
  denoise_fn = m.unet.apply  # the same object every call: it is part of the compilation key

  def txt2img(unet_params, vae_params, x_T, cond, uncond, rng, guidance_scale, schedule):
    z = sample(denoise_fn, unet_params, x_T, schedule, config, rng=rng, cond=cond, uncond=uncond,
               guidance_scale=guidance_scale)
    return m.vae.apply(vae_params, z / SD_LATENT_SCALE, method=AutoencoderKL.decode)

  b = m.s.batch
  args = (m.unet_params, m.vae_params, m.latents(b), m.context(b), m.context(b), jax.random.key(m.s.seed),
          jnp.float32(m.s.guidance_scale), sd_schedule())
  # The compiled program's FLOPs hold one trip of the scan body; add the other steps - 1 guided UNet calls.
  side, spec = m.s.latent_size, lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  unet_2b = (m.unet_params, spec(2 * b, side, side, m.s.model.latent_channels), spec(2 * b),
             spec(2 * b, CONTEXT_LENGTH, m.s.model.context_dim))

  def loop_flops() -> float | None:
    per_step = lowered_flops(denoise_fn, unet_2b)
    return None if per_step is None else (m.s.steps - 1) * per_step

  return Workload("sampler", txt2img, args, b, loop_flops=loop_flops)


def sampler_step(m: Models) -> Workload:
  """One iteration of the sampler's scan: a guided UNet call on 2B and the DDIM update (first grid step)."""
  config = SamplerConfig(sampler="ddim", num_steps=m.s.steps)
  ddim = config.make_sampler()

  def one_step(unet_params, x, cond, uncond, rng, guidance_scale, schedule):
    row = jax.tree.map(lambda a: a[0], make_plan(schedule, config).table)
    iteration = make_iteration(ddim, m.unet.apply, unet_params, rng=rng, cond=cond, uncond=uncond,
                               guidance_scale=guidance_scale)
    return iteration(ddim.init_carry(x), row, 0)["x"]

  b = m.s.batch
  args = (m.unet_params, m.latents(b), m.context(b), m.context(b), jax.random.key(m.s.seed),
          jnp.float32(m.s.guidance_scale), sd_schedule())
  return Workload("sampler_step", one_step, args, b)


BUILDERS: dict[str, Callable[[Models], Workload]] = {
    "unet_fwd": unet_fwd, "unet_train": unet_train, "vae_encode": vae_encode, "vae_decode": vae_decode,
    "sampler": sampler, "sampler_step": sampler_step,
}
