"""Stage-1 loss: GAN terms by hand, the NLL/KL/codebook terms against NumPy,
the posterior's initial log-variance, the adaptive weight
against independently computed gradient norms, and a few Adam steps of a tiny
autoencoder + discriminator."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ldm_jax.models.autoencoder import AutoencoderKL, DiagonalGaussian
from ldm_jax.models.discriminator import NLayerDiscriminator
from ldm_jax.training import autoencoder_loss as L
from ldm_jax.training.autoencoder_step import make_init_fn

RNG = np.random.default_rng(0)
X = RNG.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
FEATURES = RNG.normal(size=(3, 5)).astype(np.float32)


def perceptual(a, b):
  """A cheap, nonlinear stand-in for LPIPS with its signature: [B] distances."""
  return jnp.mean(jnp.square(jnp.tanh(a @ FEATURES) - jnp.tanh(b @ FEATURES)), axis=(1, 2, 3))


def test_gan_losses_by_hand():
  real, fake = jnp.array([[0.5, -2.0], [1.5, 0.2]]), jnp.array([[-0.3, 0.7], [-1.5, 2.0]])
  # hinge: relu(1 - real) = [0.5, 3, 0, 0.8]; relu(1 + fake) = [0.7, 1.7, 0, 3]
  np.testing.assert_allclose(L.hinge_d_loss(real, fake), 0.5 * (4.3 / 4 + 5.4 / 4), rtol=1e-6)
  softplus = lambda v: math.log1p(math.exp(v))
  real_part = sum(softplus(-r) for r in (0.5, -2.0, 1.5, 0.2)) / 4
  vanilla = 0.5 * (real_part + sum(softplus(f) for f in (-0.3, 0.7, -1.5, 2.0)) / 4)
  np.testing.assert_allclose(L.vanilla_d_loss(real, fake), vanilla, rtol=1e-6)

  cfg = L.Stage1LossConfig(disc_start=10, disc_factor=0.5, disc_loss="vanilla")
  d_loss = jax.jit(lambda step: L.discriminator_loss(cfg, real, fake, step))
  assert float(d_loss(9)[0]) == 0.0
  loss, metrics = d_loss(10)
  np.testing.assert_allclose(loss, 0.5 * vanilla, rtol=1e-6)
  np.testing.assert_allclose([metrics["logits_real"], metrics["logits_fake"]], [0.05, 0.225], rtol=1e-6)
  assert d_loss._cache_size() == 1  # the step is traced: no recompilation at disc_start
  with pytest.raises(ValueError, match="disc_loss"):
    L.Stage1LossConfig(disc_loss="wasserstein")


def test_kl_and_vq_generator_losses_match_numpy():
  x_rec = (X + RNG.normal(scale=0.2, size=X.shape)).astype(np.float32)
  post = DiagonalGaussian(jnp.asarray(RNG.normal(size=(2, 4, 4, 2)), jnp.float32), jnp.full((2, 4, 4, 2), -0.5))
  cfg = L.Stage1LossConfig(kl_weight=1e-2, perceptual_weight=0.7, codebook_weight=2.0)
  logvar = 0.3

  @jax.jit
  def both(x_rec):
    common = dict(x=X, x_rec=x_rec, step=0, lpips_fn=perceptual)
    kl_loss, (kl_m, _) = L.kl_generator_loss(cfg, posterior=post, logvar=logvar, **common)
    vq_loss, (vq_m, _) = L.vq_generator_loss(cfg, codebook_loss=jnp.float32(0.4), **common)
    return kl_loss, kl_m, vq_loss, vq_m

  kl_loss, kl_m, vq_loss, vq_m = both(x_rec)
  p = np.asarray(perceptual(X, x_rec), np.float64)
  rec = np.abs(X.astype(np.float64) - x_rec) + 0.7 * p[:, None, None, None]
  nll = np.sum(rec / np.exp(logvar) + logvar) / 2
  kl = np.sum(0.5 * (np.asarray(post.mean, np.float64) ** 2 + np.exp(-0.5) - 1 + 0.5)) / 2
  np.testing.assert_allclose([kl_m["nll"], kl_m["kl"], kl_loss], [nll, kl, nll + 1e-2 * kl], rtol=1e-5)
  np.testing.assert_allclose([kl_m["rec"], kl_m["lpips"]], [np.abs(X - x_rec).mean(), p.mean()], rtol=1e-5)
  np.testing.assert_allclose([vq_m["nll"], vq_loss], [rec.mean(), rec.mean() + 2.0 * 0.4], rtol=1e-5)
  assert float(kl_m["g_loss"]) == float(kl_m["d_weight"]) == 0.0  # no discriminator given

  with pytest.raises(ValueError, match="perceptual_weight > 0 needs lpips_fn"):
    L.vq_generator_loss(cfg, x=X, x_rec=x_rec, codebook_loss=0.0, step=0)


def test_squared_pixel_loss_option():
  x_rec = (X + RNG.normal(scale=0.2, size=X.shape)).astype(np.float32)
  post = DiagonalGaussian(jnp.asarray(RNG.normal(size=(2, 4, 4, 2)), jnp.float32), jnp.full((2, 4, 4, 2), -0.5))
  cfg = L.Stage1LossConfig(kl_weight=0.0, perceptual_weight=0.7, pixel_loss="l2")
  loss, (metrics, _) = L.kl_generator_loss(
      cfg, x=X, x_rec=x_rec, posterior=post, logvar=0.0, step=0, lpips_fn=perceptual)
  sq = (X.astype(np.float64) - x_rec) ** 2
  p = np.asarray(perceptual(X, x_rec), np.float64)
  np.testing.assert_allclose(loss, np.sum(sq + 0.7 * p[:, None, None, None]) / 2, rtol=1e-5)
  np.testing.assert_allclose(metrics["rec"], sq.mean(), rtol=1e-5)
  with pytest.raises(ValueError, match="pixel_loss"):
    L.Stage1LossConfig(pixel_loss="huber")


def test_posterior_logvar_init_shifts_only_the_posterior_log_variance():
  ddconfig = dict(ch=4, ch_mult=(1, 2), num_res_blocks=1, z_channels=2, resolution=16, norm_num_groups=2)
  ae, disc = AutoencoderKL(ddconfig=ddconfig, embed_dim=2), NLayerDiscriminator(ndf=4, n_layers=2)
  x = jnp.asarray(RNG.uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  rng = jax.random.key(0, impl="rbg")

  def init(logvar_init):
    cfg = L.Stage1LossConfig(perceptual_weight=0.0, posterior_logvar_init=logvar_init)
    return make_init_fn(ae, disc, optax.adam(1e-3), optax.adam(1e-3), cfg, x)(rng).params["ae"]

  default, shifted = init(0.0), init(-6.0)
  bias = shifted["quant_conv"]["bias"]
  np.testing.assert_array_equal(bias[2:], [-6.0, -6.0])
  np.testing.assert_array_equal(bias[:2], default["quant_conv"]["bias"][:2])
  np.testing.assert_array_equal(shifted["quant_conv"]["kernel"], default["quant_conv"]["kernel"])
  same = jax.tree.map(np.array_equal, {**default, "quant_conv": {}}, {**shifted, "quant_conv": {}})
  assert all(jax.tree.leaves(same))
  encode = jax.jit(lambda p: ae.apply({"params": p}, x, method=ae.encode))
  before, after = encode(default), encode(shifted)
  np.testing.assert_array_equal(after.mean, before.mean)
  np.testing.assert_allclose(after.logvar, before.logvar - 6.0, atol=1e-5)
  assert float(jnp.abs(before.logvar).max()) < 3.0  # the default starts near std 1


class _ToyDecoder(nn.Module):
  @nn.compact
  def __call__(self, z):
    return nn.Conv(3, (3, 3), name="conv_out")(nn.swish(nn.Conv(6, (3, 3), name="conv_in")(z)))


class _ToyAutoencoder(nn.Module):
  """Just enough autoencoder: a posterior from the encoder, decoder/conv_out last."""

  @nn.compact
  def __call__(self, x):
    posterior = DiagonalGaussian.from_moments(nn.Conv(4, (1, 1), name="encoder")(x))
    return _ToyDecoder(name="decoder")(posterior.mode()), posterior


def test_adaptive_weight_and_gradients_match_hand_computation():
  toy, disc = _ToyAutoencoder(), NLayerDiscriminator(ndf=4, n_layers=1)
  params = jax.jit(toy.init)(jax.random.key(0, impl="rbg"), X)["params"]
  disc_vars = jax.jit(disc.init)(jax.random.key(1, impl="rbg"), X)
  cfg = L.Stage1LossConfig(disc_start=3, kl_weight=0.1, perceptual_weight=0.5, disc_weight=0.8)
  logvar, step = jnp.float32(0.2), 5

  def logits_fake(img):
    return disc.apply(disc_vars, img, mutable=["batch_stats"])

  def ours(params):
    x_rec, (posterior,), last_vjp = L.forward_with_last_layer_vjp(lambda p: toy.apply({"params": p}, X), params)
    return L.kl_generator_loss(cfg, x=X, x_rec=x_rec, posterior=posterior, logvar=logvar, step=step,
                               logits_fake_fn=logits_fake, lpips_fn=perceptual, last_layer_vjp=last_vjp)

  def by_hand(params):
    """The reference recipe spelled out: separate gradients w.r.t. the kernel."""

    def terms(p):
      x_rec, posterior = toy.apply({"params": p}, X)
      rec = jnp.abs(X - x_rec) + 0.5 * perceptual(X, x_rec)[:, None, None, None]
      nll = jnp.sum(rec / jnp.exp(logvar) + logvar) / 2
      g = -jnp.mean(disc.apply(disc_vars, x_rec, mutable=["batch_stats"])[0])
      return nll, g, jnp.sum(posterior.kl()) / 2

    def with_kernel(w):
      return {**params, "decoder": {**params["decoder"], "conv_out": {**params["decoder"]["conv_out"], "kernel": w}}}

    w = params["decoder"]["conv_out"]["kernel"]
    nll_norm = jnp.linalg.norm(jax.grad(lambda w: terms(with_kernel(w))[0])(w))
    g_norm = jnp.linalg.norm(jax.grad(lambda w: terms(with_kernel(w))[1])(w))
    d_weight = jnp.clip(nll_norm / (g_norm + 1e-4), 0, 1e4) * 0.8

    def total(p):
      nll, g, kl = terms(p)
      return nll + 0.1 * kl + d_weight * g

    return d_weight, jax.value_and_grad(total)(params)

  (loss, (metrics, disc_updates)), grads = jax.jit(jax.value_and_grad(ours, has_aux=True))(params)
  d_weight, (ref_loss, ref_grads) = jax.jit(by_hand)(params)
  assert set(disc_updates) == {"batch_stats"} and float(metrics["disc_factor"]) == 1.0
  assert 1e-3 < float(d_weight) < 1e3  # a real ratio, not a clamp bound
  np.testing.assert_allclose(metrics["d_weight"], d_weight, rtol=1e-5)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, ref_grads)


NUM_STEPS = 20


def test_adam_steps_reduce_reconstruction_loss():
  ddconfig = dict(ch=4, ch_mult=(1,), num_res_blocks=1, z_channels=2, resolution=16, norm_num_groups=2)
  ae, disc = AutoencoderKL(ddconfig=ddconfig, embed_dim=2), NLayerDiscriminator(ndf=4, n_layers=2)
  cfg = L.Stage1LossConfig(disc_start=3, kl_weight=1e-6, perceptual_weight=0.0, disc_weight=0.5)
  # Random smooth images (4x4 noise, upsampled): learnable through the 2-channel bottleneck.
  x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (4, 4, 4, 3)).repeat(4, 1).repeat(4, 2), jnp.float32)
  template = jax.eval_shape(lambda x: ae.init(jax.random.key(0), x, sample_posterior=False), x)
  rng = np.random.default_rng(2)
  # Params drawn like PyTorch's default init (scale 1/sqrt(fan_in)), without compiling an init.
  fan_in_uniform = lambda s: jnp.asarray(rng.uniform(-1, 1, s.shape) / math.sqrt(np.prod(s.shape[:-1])), s.dtype)
  g_params = {"ae": jax.tree.map(fan_in_uniform, template["params"]), "logvar": jnp.float32(cfg.logvar_init)}
  d_vars = jax.jit(disc.init)(jax.random.key(1, impl="rbg"), x)
  opt = optax.adam(1e-2, b1=0.5, b2=0.9)  # the reference's betas
  state = (g_params, opt.init(g_params), d_vars, opt.init(d_vars["params"]))

  @jax.jit
  def train_step(state, step):
    g_params, g_opt, d_vars, d_opt = state
    rng = jax.random.fold_in(jax.random.key(3, impl="rbg"), step)  # rbg: quick to compile

    def g_loss_fn(g_params):
      fwd = lambda p: ae.apply({"params": p}, x, rng=rng)
      x_rec, (posterior,), last_vjp = L.forward_with_last_layer_vjp(fwd, g_params["ae"])
      disc_fn = lambda img: disc.apply(d_vars, img, mutable=["batch_stats"])
      loss, (metrics, disc_updates) = L.kl_generator_loss(
          cfg, x=x, x_rec=x_rec, posterior=posterior, logvar=g_params["logvar"], step=step,
          logits_fake_fn=disc_fn, last_layer_vjp=last_vjp)
      return loss, (metrics, x_rec, disc_updates)

    (_, (g_metrics, x_rec, disc_updates)), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(g_params)
    updates, g_opt = opt.update(g_grads, g_opt)
    g_params = optax.apply_updates(g_params, updates)

    def d_loss_fn(d_params):
      variables = {"params": d_params, "batch_stats": disc_updates["batch_stats"]}
      real, upd = disc.apply(variables, x, mutable=["batch_stats"])
      fake, upd = disc.apply({"params": d_params, **upd}, jax.lax.stop_gradient(x_rec), mutable=["batch_stats"])
      loss, metrics = L.discriminator_loss(cfg, real, fake, step)
      return loss, (metrics, upd)

    (_, (d_metrics, upd)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(d_vars["params"])
    updates, d_opt = opt.update(d_grads, d_opt)
    d_vars = {"params": optax.apply_updates(d_vars["params"], updates), **upd}
    return (g_params, g_opt, d_vars, d_opt), {**g_metrics, **d_metrics}

  history = []
  for step in range(NUM_STEPS):
    state, metrics = train_step(state, step)
    history.append(jax.device_get(metrics))
  assert train_step._cache_size() == 1
  assert all(np.isfinite(v) for m in history for v in m.values())
  assert history[2]["disc_factor"] == 0 and history[2]["disc_loss"] == 0
  assert history[3]["disc_factor"] == 1 and history[3]["d_weight"] > 0 and history[3]["disc_loss"] > 0
  assert history[-1]["rec"] < 0.7 * history[0]["rec"]  # 0.66 -> 0.38 when written
