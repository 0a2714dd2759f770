"""Low-rank adapters (LoRA) as pure functions on parameter pytrees.

An adapter of a kernel ``W`` is a pair ``down`` (A) and ``up`` (B) whose
product, scaled by ``alpha / rank``, is added to ``W``:

- dense kernel ``(in, out)``: ``down (in, r)``, ``up (r, out)``,
  ``W' = W + s * down @ up``;
- conv kernel HWIO ``(kh, kw, in, out)``: as LoRA for ``Conv2d``, ``down`` is a
  conv with W's kernel size (and stride and padding) to ``r`` channels,
  ``(kh, kw, in, r)``, and ``up`` a 1x1 conv ``(1, 1, r, out)``. Both are
  linear and the 1x1 conv neither pads nor strides, so the pair is one conv
  with ``W' = W + s * einsum("hwir,ro->hwio", down, up)``.

``rank`` is read from each ``down``'s last axis (so files with per-module
ranks apply as they were trained), ``s = alpha / rank`` (times an optional
``scale``, diffusers' ``lora_scale``).

Adapters are a plain nested dict mirroring the parameter tree, with the
adapted kernel's module in place of the kernel:
``{"params": {"input_blocks_1_1": {..., "to_q": {"down": A, "up": B}}}}``. So
the path rules of ``ldm_jax.parallel.partitioning`` lay them out like any
other parameter (they are small: replicated).

Training keeps the base weights frozen and differentiates only the adapters
through :func:`apply_adapters`, which adds the delta inside the jitted step.
That is mathematically identical to LoRA's two-branch forward
``x W + s (x A) B`` (the sum is linear in the weights) and costs one small
matmul per adapted kernel and step. :func:`merge` is the same function, named
for sampling: merge once, then sample at the base model's speed.
"""

import dataclasses
import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

# Named target groups, as regular expressions over the ``/``-joined module
# path (a kernel's path without its ``kernel`` leaf). Anchored at a path
# component so that a leading ``params/`` level does not matter.
TARGET_GROUPS: dict[str, str] = {
    # UNet SpatialTransformer attention projections (LoRA's usual choice).
    "attention": r"(^|/)transformer_blocks_\d+/attn[12]/(to_q|to_k|to_v|to_out_0)$",
    # SpatialTransformer input/output projections (1x1 convs in SD v1, dense in SD v2).
    "proj": r"(^|/)(proj_in|proj_out)$",
    # The transformer blocks' GEGLU feed-forward.
    "ff": r"(^|/)transformer_blocks_\d+/ff/(net_0/proj|net_2)$",
    # Every UNet convolution: ResBlock convs and 1x1 skips, down/upsampling, conv_in, conv_out.
    "conv": r"(^|/)((input_blocks|output_blocks|middle_block)_\d+(_\d+)?/(in_layers_2|out_layers_3|skip_connection|op"
            r"|conv)|input_blocks_0_0|out_2)$",
    # The time embedding MLP and the ResBlocks' projections of it.
    "time_embedding": r"(^|/)(time_embed_0|time_embed_2|emb_layers_1)$",
    # CLIP text encoder (transformers names) attention and MLP.
    "text_attention": r"(^|/)self_attn/(q_proj|k_proj|v_proj|out_proj)$",
    "text_mlp": r"(^|/)mlp/(fc1|fc2)$",
}
INITS = ("kaiming_uniform", "gaussian")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """Which kernels get adapters, and their size and scale.

  Attributes:
    rank: inner dimension r of every new adapter.
    alpha: the update is scaled by ``alpha / rank`` (alpha = rank: scale 1).
    targets: names of :data:`TARGET_GROUPS` or regular expressions (``re.search``)
      over ``/``-joined module paths (``input_blocks_1_1/proj_in``).
    init: ``down`` init: ``"kaiming_uniform"`` (PyTorch Linear's default, as
      peft: U(-1/sqrt(fan_in), 1/sqrt(fan_in))) or ``"gaussian"`` (N(0, 1/r²)).
      ``up`` is always zero, so a fresh adapter leaves the model unchanged.
  """

  rank: int = 4
  alpha: float = 4.0
  targets: tuple[str, ...] = ("attention",)
  init: str = "kaiming_uniform"

  def __post_init__(self):
    if isinstance(self.targets, str):  # a single pattern, e.g. from a config override
      object.__setattr__(self, "targets", (self.targets,))
    object.__setattr__(self, "targets", tuple(self.targets))
    problems = []
    if not isinstance(self.rank, int) or self.rank < 1:
      problems.append(f"rank={self.rank!r} (a positive integer)")
    if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
      problems.append(f"alpha={self.alpha!r} (a positive number)")
    if self.init not in INITS:
      problems.append(f"init={self.init!r} (one of {INITS})")
    if not self.targets:
      problems.append("targets is empty")
    for t in self.targets:
      try:
        re.compile(TARGET_GROUPS.get(t, t))
      except re.error as e:
        problems.append(f"target {t!r} is neither a group {sorted(TARGET_GROUPS)} nor a regular expression ({e})")
    if problems:
      raise ValueError("Bad LoRAConfig: " + "; ".join(problems))

  @property
  def patterns(self) -> tuple[str, ...]:
    """The targets as regular expressions."""
    return tuple(TARGET_GROUPS.get(t, t) for t in self.targets)


def target_paths(params: Mapping[str, Any], config: LoRAConfig) -> list[tuple[str, ...]]:
  """Module paths (kernel path without ``kernel``) that ``config.targets`` select, in tree order."""
  patterns = [re.compile(p) for p in config.patterns]
  found = []
  for path in traverse_util.flatten_dict(params):
    if path[-1] != "kernel":
      continue
    module = path[:-1]
    if any(p.search("/".join(module)) for p in patterns):
      found.append(module)
  return found


def adapter_shapes(kernel_shape: Sequence[int], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """``(down, up)`` shapes for a dense ``(in, out)`` or HWIO conv kernel."""
  kernel_shape = tuple(kernel_shape)
  if len(kernel_shape) == 2:
    return (kernel_shape[0], rank), (rank, kernel_shape[1])
  if len(kernel_shape) == 4:
    kh, kw, cin, cout = kernel_shape
    return (kh, kw, cin, rank), (1, 1, rank, cout)
  raise ValueError(f"LoRA adapts dense (in, out) and 2-D conv HWIO kernels, not a kernel of shape {kernel_shape}")


def init_adapters(params: Mapping[str, Any], config: LoRAConfig, rng: jax.Array) -> dict[str, Any]:
  """Fresh adapters (``down`` random, ``up`` zero) for every kernel ``config.targets`` select.

  ``params`` may be arrays or ``jax.ShapeDtypeStruct``s (only shapes are
  read); adapters are float32. One compiled program makes them all.
  """
  modules = target_paths(params, config)
  if not modules:
    kernels = ["/".join(p[:-1]) for p in traverse_util.flatten_dict(params) if p[-1] == "kernel"]
    raise ValueError(f"LoRA targets {list(config.targets)} match no kernel; kernels look like {kernels[:5]}")
  flat = traverse_util.flatten_dict(params)
  bad, shapes = [], []
  for module in modules:
    shape = tuple(flat[(*module, "kernel")].shape)
    try:
      shapes.append((module, *adapter_shapes(shape, config.rank)))
    except ValueError:
      bad.append(f"{'/'.join(module)} {shape}")
  if bad:
    raise ValueError(f"LoRA targets select kernels that are neither dense nor 2-D conv: {bad}")
  return _init(rng, tuple(shapes), config)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _init(rng: jax.Array, shapes: tuple, config: LoRAConfig) -> dict[str, Any]:
  # One draw for all adapters, sliced: a random op per adapter costs seconds of compile each.
  sizes = [int(np.prod(down)) for _, down, _ in shapes]
  if config.init == "kaiming_uniform":
    noise = jax.random.uniform(rng, (sum(sizes),), jnp.float32, -1.0, 1.0)
  else:
    noise = jax.random.normal(rng, (sum(sizes),), jnp.float32)
  out, start = {}, 0
  for (module, down_shape, up_shape), size in zip(shapes, sizes):
    # kaiming-uniform bound 1/sqrt(fan_in) (PyTorch Linear's, as peft); gaussian std 1/r.
    std = 1.0 / math.sqrt(int(np.prod(down_shape[:-1]))) if config.init == "kaiming_uniform" else 1.0 / config.rank
    out[(*module, "down")] = std * noise[start:start + size].reshape(down_shape)
    out[(*module, "up")] = jnp.zeros(up_shape, jnp.float32)
    start += size
  return traverse_util.unflatten_dict(out)


def lora_delta(down: jax.Array, up: jax.Array) -> jax.Array:
  """The unscaled update ``down @ up`` in the kernel's layout (dense or HWIO)."""
  if down.ndim == 2:
    return down @ up
  return jnp.einsum("hwir,ro->hwio", down, up.reshape(up.shape[-2:]))


def _modules(adapters: Mapping[str, Any]) -> dict[tuple[str, ...], dict[str, Any]]:
  """``{module path: {"down", "up"}}`` of a nested adapters tree."""
  out: dict[tuple[str, ...], dict[str, Any]] = {}
  for path, value in traverse_util.flatten_dict(adapters).items():
    out.setdefault(path[:-1], {})[path[-1]] = value
  return out


def apply_adapters(
    params: Mapping[str, Any], adapters: Mapping[str, Any], config: LoRAConfig, *, scale: float | jax.Array = 1.0
) -> dict[str, Any]:
  """``params`` with ``W + scale * (alpha / r) * delta`` in place of each adapted kernel.

  Pure and jit-friendly: differentiate a loss of the result with respect to
  ``adapters`` only to train LoRA with the base weights frozen. Every
  adapter must name a kernel of ``params`` with a matching shape; all that
  do not are named in one error.
  """
  flat = traverse_util.flatten_dict(params)
  problems = []
  for module, pair in _modules(adapters).items():
    name = "/".join(module)
    kernel_path = (*module, "kernel")
    if set(pair) != {"down", "up"}:
      problems.append(f"{name}: adapter leaves {sorted(pair)} (expected down, up)")
      continue
    if kernel_path not in flat:
      problems.append(f"{name}: no such kernel in the parameters")
      continue
    kernel, down, up = flat[kernel_path], pair["down"], pair["up"]
    rank = down.shape[-1]
    try:
      expected = adapter_shapes(kernel.shape, rank)
    except ValueError as e:
      problems.append(f"{name}: {e}")
      continue
    if (tuple(down.shape), tuple(up.shape)) != expected:
      problems.append(f"{name}: down {tuple(down.shape)} / up {tuple(up.shape)} do not fit kernel "
                      f"{tuple(kernel.shape)} (expected {expected[0]} / {expected[1]})")
      continue
    compute = jnp.promote_types(kernel.dtype, jnp.promote_types(down.dtype, up.dtype))
    delta = lora_delta(down.astype(compute), up.astype(compute))
    flat[kernel_path] = (kernel.astype(compute) + (scale * config.alpha / rank) * delta).astype(kernel.dtype)
  if problems:
    raise ValueError("LoRA adapters do not fit the parameters:\n  " + "\n  ".join(problems))
  return traverse_util.unflatten_dict(flat)


@functools.partial(jax.jit, static_argnames=("config",))
def merge(
    params: Mapping[str, Any], adapters: Mapping[str, Any], config: LoRAConfig, *, scale: float | jax.Array = 1.0
) -> dict[str, Any]:
  """Merged weights for sampling at full speed: :func:`apply_adapters` as one compiled program."""
  return apply_adapters(params, adapters, config, scale=scale)


def adapter_param_count(adapters: Mapping[str, Any]) -> int:
  """Number of trainable LoRA parameters."""
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(adapters)))
