"""Scaled dot-product attention through ``jax.nn.dot_product_attention``.

One place chooses the kernel: cuDNN's fused flash attention on GPU when the
dtype and head size allow it, XLA's otherwise. Softmax statistics are float32
in both.
"""

from typing import Literal

import jax
import jax.numpy as jnp

Implementation = Literal["auto", "xla", "cudnn"]


def _cudnn_supports(dtype: jnp.dtype, head_dim: int) -> bool:
  if jax.default_backend() != "gpu":
    return False
  if dtype not in (jnp.bfloat16, jnp.float16):
    return False
  kind = jax.devices()[0].device_kind.lower()
  max_head = 256 if ("h100" in kind or "h200" in kind or "h800" in kind) else 128
  return head_dim % 8 == 0 and head_dim <= max_head


def choose_implementation(
    requested: Implementation, dtype: jnp.dtype, head_dim: int, has_mask: bool = False
) -> str:
  """Resolves ``"auto"`` to the fastest kernel that supports these inputs."""
  if requested == "auto":
    # cuDNN's flash kernel takes padding masks only as sequence lengths; with
    # an arbitrary boolean mask we stay on XLA.
    return "cudnn" if (_cudnn_supports(jnp.dtype(dtype), head_dim) and not has_mask) else "xla"
  if requested not in ("xla", "cudnn"):
    raise ValueError(f"attention implementation must be 'auto', 'xla' or 'cudnn', got {requested!r}")
  return requested


def dot_product_attention(
    q_BxTxNxH: jax.Array,
    k_BxSxNxH: jax.Array,
    v_BxSxNxH: jax.Array,
    mask: jax.Array | None = None,
    *,
    is_causal: bool = False,
    implementation: Implementation = "auto",
) -> jax.Array:
  """Multi-head attention on ``(batch, length, heads, head_dim)`` arrays.

  ``mask`` is boolean, True where a key may be attended to, broadcastable to
  ``(B, N, T, S)``.
  """
  impl = choose_implementation(
      implementation, q_BxTxNxH.dtype, q_BxTxNxH.shape[-1], has_mask=mask is not None
  )
  if mask is not None:
    mask = jnp.asarray(mask, bool)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
  return jax.nn.dot_product_attention(
      q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, mask=mask, is_causal=is_causal, implementation=impl
  )
