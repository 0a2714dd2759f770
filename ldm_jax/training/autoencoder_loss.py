"""Stage-1 losses: LPIPSWithDiscriminator (KL) and VQLPIPSWithDiscriminator (VQ).

Pure functions, usable inside ``jax.jit``; the train step owns the models.

Generator side, per pixel: ``rec = |x - x̂| + perceptual_weight * LPIPS(x, x̂)``
(``(x - x̂)²`` in place of ``|x - x̂|`` with ``pixel_loss="l2"``), then

- KL: ``nll = sum(rec / exp(logvar) + logvar) / B``, loss ``nll +
  kl_weight * sum(KL) / B + d_weight * disc_factor * g_loss``;
- VQ: ``nll = mean(rec)``, loss ``nll + d_weight * disc_factor * g_loss +
  codebook_weight * codebook_loss``;

with ``g_loss = -mean(D(x̂))`` and the adaptive weight ``d_weight =
disc_weight * clip(|∇_W nll| / (|∇_W g_loss| + 1e-4), 0, 1e4)`` (no
gradient), W the decoder's last kernel. ``disc_factor`` is 0 before
``disc_start`` (a ``jnp.where`` on the traced step: no recompilation).

How the adaptive weight stays cheap: :func:`forward_with_last_layer_vjp`
runs the autoencoder once under ``jax.vjp`` with respect to W alone, giving
x̂ and a pullback ``ct_x̂ ↦ ∂/∂W``. Each loss term is then evaluated under
``jax.vjp`` with respect to x̂, so its value and its cotangent on x̂ come from
one pass; two applications of the pullback (a conv-weight gradient each) give
the two norms. No second forward of the autoencoder, and the outer
``jax.grad`` of the total loss differentiates through the same primal values.

A KL generator step, schematically (VQ: ``rest`` is ``(codebook_loss,
info)`` and :func:`vq_generator_loss`)::

  def g_loss_fn(g_params):  # {"ae": ..., "logvar": ...}
    fwd = lambda p: ae.apply({"params": p}, x, rng=rng)  # -> (x̂, posterior)
    x_rec, (posterior,), last_vjp = forward_with_last_layer_vjp(fwd, g_params["ae"])
    disc_fn = lambda img: disc.apply(d_vars, img, mutable=["batch_stats"])
    return kl_generator_loss(cfg, x=x, x_rec=x_rec, posterior=posterior,
                             logvar=g_params["logvar"], logits_fake_fn=disc_fn,
                             lpips_fn=lpips_fn, step=step, last_layer_vjp=last_vjp)
  # -> (loss, (metrics, disc_aux)); disc_aux is what disc_fn returned beside
  # the logits (here the new batch_stats). Use jax.grad(..., has_aux=True).

The discriminator step then calls the discriminator twice, on ``x`` and on
``stop_gradient(x̂)``, and takes :func:`discriminator_loss`.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from ldm_jax.models.autoencoder import DiagonalGaussian
from ldm_jax.models.vq import QuantizerInfo

Array = jax.Array
LAST_LAYER = ("decoder", "conv_out", "kernel")
LpipsFn = Callable[[Array, Array], Array]  # (x, x̂) -> [B]
LogitsFn = Callable[[Array], tuple[Array, Any]]  # x̂ -> (logits, aux e.g. new batch_stats)
Pullback = Callable[[Array], Array]  # cotangent on x̂ -> gradient on W


@dataclasses.dataclass(frozen=True)
class Stage1LossConfig:
  """The reference ``lossconfig.params`` that shape the loss (same names).

  Discriminator architecture keys (disc_num_layers, disc_in_channels,
  disc_ndf, use_actnorm) belong to :class:`NLayerDiscriminator`.
  """

  disc_start: int = 0
  logvar_init: float = 0.0
  kl_weight: float = 1.0
  codebook_weight: float = 1.0
  perceptual_weight: float = 1.0
  disc_factor: float = 1.0
  disc_weight: float = 1.0
  disc_loss: str = "hinge"
  # Not a reference key: "l1" (the reference) or "l2" (squared error, which
  # maximises PSNR directly: short CPU runs on the shapes reach more with it).
  pixel_loss: str = "l1"
  # Not a reference key: the initial bias of the posterior's log-variance
  # channels (quant_conv; KL models only). 0 is the reference's init, which
  # starts every latent channel at posterior std 1, far above the latent's
  # own spread at init; see configs/autoencoder.py:demo.
  posterior_logvar_init: float = 0.0

  def __post_init__(self):
    if self.disc_loss not in ("hinge", "vanilla"):
      raise ValueError(f"disc_loss must be 'hinge' or 'vanilla', got {self.disc_loss!r}")
    if self.pixel_loss not in ("l1", "l2"):
      raise ValueError(f"pixel_loss must be 'l1' or 'l2', got {self.pixel_loss!r}")


# --------------------------------------------------------------- GAN pieces


def hinge_d_loss(logits_real: Array, logits_fake: Array) -> Array:
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: Array, logits_fake: Array) -> Array:
  return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


def disc_factor_at(cfg: Stage1LossConfig, step: Array) -> Array:
  """``disc_factor`` from ``disc_start`` on, 0 before (the reference adopt_weight)."""
  return jnp.where(jnp.asarray(step) < cfg.disc_start, 0.0, cfg.disc_factor).astype(jnp.float32)


def adaptive_weight(nll_grad_norm: Array, g_grad_norm: Array, disc_weight: float) -> Array:
  """disc_weight · clip(|∇nll| / (|∇g| + 1e-4), 0, 1e4), with no gradient."""
  ratio = jnp.clip(nll_grad_norm / (g_grad_norm + 1e-4), 0.0, 1e4)
  return jax.lax.stop_gradient(ratio) * disc_weight


def forward_with_last_layer_vjp(
    forward: Callable[[Mapping[str, Any]], tuple[Any, ...]],
    params: Mapping[str, Any],
    last_layer: tuple[str, ...] = LAST_LAYER,
) -> tuple[Array, tuple[Any, ...], Pullback]:
  """Runs ``forward(params) -> (x̂, *rest)`` once and returns ``(x̂, rest,
  pullback)``, the pullback taking a cotangent on x̂ to the gradient on
  ``params[last_layer]``.

  ``rest`` is the posterior for AutoencoderKL, (codebook loss, info) for
  VQModel. All outputs stay differentiable with respect to all of ``params``
  for an enclosing ``jax.grad``.
  """

  def with_kernel(kernel):
    x_rec, *rest = forward(_replace_leaf(params, last_layer, kernel))
    return x_rec, tuple(rest)

  x_rec, pullback, rest = jax.vjp(with_kernel, _get_leaf(params, last_layer), has_aux=True)
  return x_rec, rest, lambda ct: pullback(ct)[0]


def _get_leaf(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
  for key in path:
    if key not in tree:
      raise KeyError(f"no parameter {'/'.join(path)!r} (missing {key!r}); pass last_layer=<path>")
    tree = tree[key]
  return tree


def _replace_leaf(tree: Mapping[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
  head, *rest = path
  new = dict(tree)
  new[head] = _replace_leaf(tree[head], tuple(rest), value) if rest else value
  return new


def _value_and_cotangent(fn: Callable[[Array], tuple[Array, Any]], x_rec: Array) -> tuple[Array, Array, Any]:
  """(fn(x̂), ∂fn/∂x̂, aux) from one evaluation of a scalar ``fn`` with aux."""
  value, pullback, aux = jax.vjp(fn, x_rec, has_aux=True)
  (cotangent,) = pullback(jnp.ones_like(value))
  return value, cotangent, aux


def _adversarial(
    cfg: Stage1LossConfig,
    nll_fn: Callable[[Array], tuple[Array, Any]],
    x_rec: Array,
    logits_fake_fn: LogitsFn | None,
    step: Array,
    last_layer_vjp: Pullback | None,
) -> tuple[Array, Array, Array, Array, Any, Any]:
  """(nll, g_loss, d_weight, disc_factor, nll aux, discriminator aux)."""
  factor = disc_factor_at(cfg, step)
  zero = jnp.zeros((), jnp.float32)
  if logits_fake_fn is None:  # no discriminator: pure reconstruction training
    nll, nll_aux = nll_fn(x_rec)
    return nll, zero, zero, factor, nll_aux, None

  def g_fn(img):
    logits, disc_aux = logits_fake_fn(img)
    return -jnp.mean(logits.astype(jnp.float32)), disc_aux

  if last_layer_vjp is None or cfg.disc_factor == 0.0:
    # Evaluation (no gradients), or the GAN switched off: d_weight is 0 as in
    # the reference.
    (nll, nll_aux), (g_loss, disc_aux) = nll_fn(x_rec), g_fn(x_rec)
    return nll, g_loss, zero, factor, nll_aux, disc_aux
  nll, ct_nll, nll_aux = _value_and_cotangent(nll_fn, x_rec)
  g_loss, ct_g, disc_aux = _value_and_cotangent(g_fn, x_rec)
  d_weight = adaptive_weight(
      jnp.linalg.norm(last_layer_vjp(ct_nll)), jnp.linalg.norm(last_layer_vjp(ct_g)), cfg.disc_weight
  )
  return nll, g_loss, d_weight, factor, nll_aux, disc_aux


def _rec_loss(
    cfg: Stage1LossConfig, x: Array, x_rec: Array, lpips_fn: LpipsFn | None
) -> tuple[Array, dict[str, Array]]:
  """Per-pixel |x - x̂| (or (x - x̂)² with pixel_loss="l2") + perceptual_weight · LPIPS
  (broadcast per image). The logged "rec" is the pixel term's mean."""
  x, x_rec = x.astype(jnp.float32), x_rec.astype(jnp.float32)
  pixel = jnp.square(x - x_rec) if cfg.pixel_loss == "l2" else jnp.abs(x - x_rec)
  rec = pixel
  p_loss = jnp.zeros((x.shape[0],), jnp.float32)
  if cfg.perceptual_weight > 0:
    if lpips_fn is None:
      raise ValueError(
          "perceptual_weight > 0 needs lpips_fn: load weights with ldm_jax.interop.lpips.load_lpips_params "
          "and pass make_lpips_fn(params), or set perceptual_weight=0"
      )
    p_loss = lpips_fn(x, x_rec).astype(jnp.float32)
    rec = pixel + cfg.perceptual_weight * p_loss[:, None, None, None]
  return rec, {"rec": jnp.mean(pixel), "lpips": jnp.mean(p_loss)}


def kl_generator_loss(
    cfg: Stage1LossConfig,
    *,
    x: Array,
    x_rec: Array,
    posterior: DiagonalGaussian,
    logvar: Array,
    step: Array,
    logits_fake_fn: LogitsFn | None = None,
    lpips_fn: LpipsFn | None = None,
    last_layer_vjp: Pullback | None = None,
) -> tuple[Array, tuple[dict[str, Array], Any]]:
  """LPIPSWithDiscriminator, generator side: (loss, (metrics, discriminator aux)).

  ``logvar`` is the learned scalar (init ``cfg.logvar_init``); note the
  reference's optimiser leaves it out, so it stays at its init there.
  """

  def nll_fn(img):
    rec, rec_metrics = _rec_loss(cfg, x, img, lpips_fn)
    nll = rec / jnp.exp(logvar) + logvar
    return jnp.sum(nll) / nll.shape[0], rec_metrics

  nll, g_loss, d_weight, factor, rec_metrics, disc_aux = _adversarial(
      cfg, nll_fn, x_rec, logits_fake_fn, step, last_layer_vjp
  )
  kl = jnp.sum(posterior.kl()) / posterior.mean.shape[0]
  loss = nll + cfg.kl_weight * kl + d_weight * factor * g_loss
  metrics = dict(
      rec_metrics, total=loss, nll=nll, kl=kl, logvar=jnp.asarray(logvar, jnp.float32),
      g_loss=g_loss, d_weight=d_weight, disc_factor=factor,
  )
  return loss, (metrics, disc_aux)


def vq_generator_loss(
    cfg: Stage1LossConfig,
    *,
    x: Array,
    x_rec: Array,
    codebook_loss: Array,
    step: Array,
    quantizer_info: QuantizerInfo | None = None,
    logits_fake_fn: LogitsFn | None = None,
    lpips_fn: LpipsFn | None = None,
    last_layer_vjp: Pullback | None = None,
) -> tuple[Array, tuple[dict[str, Array], Any]]:
  """VQLPIPSWithDiscriminator, generator side: (loss, (metrics, discriminator aux))."""

  def nll_fn(img):
    rec, rec_metrics = _rec_loss(cfg, x, img, lpips_fn)
    return jnp.mean(rec), rec_metrics

  nll, g_loss, d_weight, factor, rec_metrics, disc_aux = _adversarial(
      cfg, nll_fn, x_rec, logits_fake_fn, step, last_layer_vjp
  )
  codebook_loss = jnp.mean(codebook_loss)
  loss = nll + d_weight * factor * g_loss + cfg.codebook_weight * codebook_loss
  metrics = dict(
      rec_metrics, total=loss, nll=nll, codebook=codebook_loss, g_loss=g_loss, d_weight=d_weight, disc_factor=factor
  )
  if quantizer_info is not None:
    metrics.update(perplexity=quantizer_info.perplexity, usage=quantizer_info.usage)
  return loss, (metrics, disc_aux)


def discriminator_loss(
    cfg: Stage1LossConfig, logits_real: Array, logits_fake: Array, step: Array
) -> tuple[Array, dict[str, Array]]:
  """Discriminator side: disc_factor · (hinge or vanilla loss), with metrics.

  Pass logits of real images and of *stop-gradient* reconstructions, each
  from its own discriminator call (own BatchNorm statistics, as the reference).
  """
  logits_real, logits_fake = logits_real.astype(jnp.float32), logits_fake.astype(jnp.float32)
  fn = hinge_d_loss if cfg.disc_loss == "hinge" else vanilla_d_loss
  d_loss = disc_factor_at(cfg, step) * fn(logits_real, logits_fake)
  return d_loss, {"disc_loss": d_loss, "logits_real": jnp.mean(logits_real), "logits_fake": jnp.mean(logits_fake)}
