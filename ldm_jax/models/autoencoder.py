"""Stage-1 Encoder/Decoder and the KL-regularised autoencoder (LDM's AutoencoderKL).

Fields are the reference ``ddconfig`` names, so a YAML config's
``first_stage_config.params`` maps on directly:
``AutoencoderKL(embed_dim=4, ddconfig=dict(ch=128, ch_mult=(1, 2, 4, 4), ...))``.
Parameter paths mirror the reference state dict (``encoder/down_0/block_1/
conv1/kernel``, ``decoder/up_3/upsample/conv/kernel``, ``quant_conv``, ...).
"""

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from ldm_jax.nn.ae_blocks import AE_NORM_EPS, MidBlock, ResolutionLevel, conv
from ldm_jax.nn.norm import GroupNorm

Dtype = Any


class _Trunk(nn.Module):
  """The ddconfig fields shared by Encoder and Decoder (each uses a subset)."""

  ch: int = 128
  out_ch: int = 3
  ch_mult: Sequence[int] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = ()
  dropout: float = 0.0
  resamp_with_conv: bool = True
  in_channels: int = 3
  resolution: int = 256
  z_channels: int = 4
  double_z: bool = True
  use_mid_attn: bool = True  # False is the reference's attn_type="none"
  norm_num_groups: int = 32
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    # YAML gives lists; tuples keep the module hashable.
    object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
    object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
    super().__post_init__()

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  def _common(self) -> dict[str, Any]:
    return dict(norm_num_groups=self.norm_num_groups, dtype=self.dtype, param_dtype=self.param_dtype)

  def _level(self, out_channels, num_blocks, res, resample, name) -> ResolutionLevel:
    return ResolutionLevel(
        out_channels=out_channels,
        num_blocks=num_blocks,
        use_attn=res in self.attn_resolutions,
        resample=resample,
        resamp_with_conv=self.resamp_with_conv,
        dropout=self.dropout,
        attention_impl=self.attention_impl,
        **self._common(),
        name=name,
    )

  def _mid(self) -> MidBlock:
    return MidBlock(
        use_attn=self.use_mid_attn,
        dropout=self.dropout,
        attention_impl=self.attention_impl,
        **self._common(),
        name="mid",
    )

  def _out(self, h: jax.Array, features: int) -> jax.Array:
    h = GroupNorm(
        self.norm_num_groups, epsilon=AE_NORM_EPS, silu=True, param_dtype=self.param_dtype, name="norm_out"
    )(h)
    return conv(features, 3, dtype=self.dtype, param_dtype=self.param_dtype, name="conv_out")(h)

  def _check_input(self, x: jax.Array, channels: int, multiple: int, what: str) -> None:
    if x.ndim != 4 or x.shape[-1] != channels:
      raise ValueError(f"{type(self).__name__} expects NHWC {what} with {channels} channels, got shape {x.shape}")
    if x.shape[1] % multiple or x.shape[2] % multiple:
      raise ValueError(
          f"{type(self).__name__}: height and width must be multiples of {multiple} "
          f"(ch_mult has {len(self.ch_mult)} levels), got {x.shape[1]}x{x.shape[2]}"
      )


class Encoder(_Trunk):
  """Image → ``z_channels`` (x2 with ``double_z``) at 1/downsample_factor size."""

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, *, deterministic: bool = True) -> jax.Array:
    self._check_input(x_BxHxWxC, self.in_channels, self.downsample_factor, "images")
    h = conv(self.ch, 3, dtype=self.dtype, param_dtype=self.param_dtype, name="conv_in")(x_BxHxWxC)
    res = self.resolution
    for i, mult in enumerate(self.ch_mult):
      last = i == len(self.ch_mult) - 1
      h = self._level(self.ch * mult, self.num_res_blocks, res, None if last else "down", f"down_{i}")(
          h, deterministic=deterministic
      )
      res = res if last else res // 2
    h = self._mid()(h, deterministic=deterministic)
    return self._out(h, 2 * self.z_channels if self.double_z else self.z_channels)


class Decoder(_Trunk):
  """Latent → image. Levels are named by resolution index (``up_0`` is the
  full-resolution one) although they run from the lowest resolution up, and
  each has ``num_res_blocks + 1`` ResnetBlocks, as in the reference."""

  @nn.compact
  def __call__(self, z_BxhxwxZ: jax.Array, *, deterministic: bool = True) -> jax.Array:
    self._check_input(z_BxhxwxZ, self.z_channels, 1, "latents")
    h = conv(self.ch * self.ch_mult[-1], 3, dtype=self.dtype, param_dtype=self.param_dtype, name="conv_in")(z_BxhxwxZ)
    h = self._mid()(h, deterministic=deterministic)
    res = self.resolution // self.downsample_factor
    for i in reversed(range(len(self.ch_mult))):
      h = self._level(self.ch * self.ch_mult[i], self.num_res_blocks + 1, res, "up" if i else None, f"up_{i}")(
          h, deterministic=deterministic
      )
      res = res * 2 if i else res
    return self._out(h, self.out_ch)


_DDCONFIG_KEYS = frozenset(f.name for f in dataclasses.fields(_Trunk)) - {
    "attention_impl", "dtype", "param_dtype", "parent", "name",
}


def freeze_ddconfig(ddconfig: Mapping[str, Any]) -> FrozenDict:
  """Validates a reference ``ddconfig`` and makes it hashable (lists → tuples).

  Accepts the reference's ``attn_type`` ("vanilla" or "none"; "linear" is not
  implemented) and turns it into ``use_mid_attn``.
  """
  cfg = dict(ddconfig)
  attn_type = cfg.pop("attn_type", None)
  if attn_type is not None:
    if attn_type not in ("vanilla", "none"):
      raise ValueError(f"ddconfig attn_type must be 'vanilla' or 'none', got {attn_type!r}")
    cfg["use_mid_attn"] = attn_type == "vanilla"
  unknown = sorted(set(cfg) - _DDCONFIG_KEYS)
  if unknown:
    raise ValueError(f"unknown ddconfig keys {unknown}; expected a subset of {sorted(_DDCONFIG_KEYS)}")
  return FrozenDict({k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in cfg.items()})


class DiagonalGaussian(NamedTuple):
  """The KL autoencoder's posterior N(mean, exp(logvar)), a pytree of two
  NHWC arrays (float32)."""

  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments_BxHxWx2C: jax.Array) -> "DiagonalGaussian":
    """Splits channels into (mean, logvar) and clamps logvar to [-30, 20]."""
    mean, logvar = jnp.split(moments_BxHxWx2C.astype(jnp.float32), 2, axis=-1)
    return cls(mean, jnp.clip(logvar, -30.0, 20.0))

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self) -> jax.Array:
    return jnp.exp(self.logvar)

  def sample(self, rng: jax.Array) -> jax.Array:
    return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

  def mode(self) -> jax.Array:
    return self.mean

  def kl(self, other: "DiagonalGaussian | None" = None) -> jax.Array:
    """KL(self || other), other defaulting to N(0, I); summed over H, W, C → [B]."""
    if other is None:
      terms = jnp.square(self.mean) + self.var - 1.0 - self.logvar
    else:
      terms = (
          jnp.square(self.mean - other.mean) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar
      )
    return 0.5 * jnp.sum(terms, axis=(1, 2, 3))

  def nll(self, sample: jax.Array) -> jax.Array:
    """Negative log-likelihood of ``sample``, summed over H, W, C → [B]."""
    terms = math.log(2.0 * math.pi) + self.logvar + jnp.square(sample - self.mean) / self.var
    return 0.5 * jnp.sum(terms, axis=(1, 2, 3))


class FirstStageMixin:
  """What AutoencoderKL and VQModel share. The host module has the fields
  ``ddconfig``, ``embed_dim``, ``attention_impl``, ``dtype``, ``param_dtype``."""

  def __post_init__(self):
    object.__setattr__(self, "ddconfig", freeze_ddconfig(self.ddconfig))
    super().__post_init__()

  @property
  def downsample_factor(self) -> int:
    """Image pixels per latent pixel along each side: 2 ** (len(ch_mult) - 1)."""
    return 2 ** (len(self.ddconfig.get("ch_mult", _Trunk.ch_mult)) - 1)

  @property
  def latent_channels(self) -> int:
    return self.embed_dim

  def _setup_first_stage(self, quant_channels: int) -> None:
    """Creates encoder, decoder, quant_conv and post_quant_conv (call in setup)."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    trunk = dict(self.ddconfig, attention_impl=self.attention_impl, **kw)
    self.encoder, self.decoder = Encoder(**trunk), Decoder(**trunk)
    self.quant_conv = conv(quant_channels, 1, **kw)
    self.post_quant_conv = conv(self.ddconfig.get("z_channels", _Trunk.z_channels), 1, **kw)


class AutoencoderKL(FirstStageMixin, nn.Module):
  """Encoder → quant_conv → DiagonalGaussian → post_quant_conv → Decoder.

  With ``ddconfig["dropout"] > 0``, train with ``deterministic=False`` and
  ``rngs={"dropout": key}``.
  """

  ddconfig: Mapping[str, Any]
  embed_dim: int
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    if not self.ddconfig.get("double_z", True):
      raise ValueError("AutoencoderKL needs ddconfig double_z=True: its encoder predicts mean and log-variance")
    self._setup_first_stage(2 * self.embed_dim)

  def encode(self, x_BxHxWxC: jax.Array, *, deterministic: bool = True) -> DiagonalGaussian:
    """Images in [-1, 1] → posterior over ``embed_dim``-channel latents."""
    return DiagonalGaussian.from_moments(self.quant_conv(self.encoder(x_BxHxWxC, deterministic=deterministic)))

  def decode(self, z_BxhxwxE: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """Latents (unscaled: divide diffusion latents by the scale factor first) → images."""
    return self.decoder(self.post_quant_conv(z_BxhxwxE), deterministic=deterministic)

  def __call__(
      self,
      x_BxHxWxC: jax.Array,
      *,
      sample_posterior: bool = True,
      rng: jax.Array | None = None,
      deterministic: bool = True,
  ) -> tuple[jax.Array, DiagonalGaussian]:
    """Returns (reconstruction, posterior); ``rng`` draws the posterior sample."""
    posterior = self.encode(x_BxHxWxC, deterministic=deterministic)
    if sample_posterior:
      if rng is None:
        raise ValueError("AutoencoderKL(sample_posterior=True) needs rng=<PRNG key>")
      z = posterior.sample(rng)
    else:
      z = posterior.mode()
    return self.decode(z, deterministic=deterministic), posterior
