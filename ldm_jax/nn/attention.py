"""Scaled dot-product attention through ``jax.nn.dot_product_attention``.

One place chooses the kernel: cuDNN's fused flash attention on GPU when the
dtype, head size and sequence lengths allow it, XLA's otherwise. Softmax
statistics are float32 in both.
"""

from typing import Literal

import jax
import jax.numpy as jnp

Implementation = Literal["auto", "xla", "cudnn"]


def _gpu_kind() -> str | None:
  """The default device's kind (lower case) when JAX runs on a GPU, else None."""
  if jax.default_backend() != "gpu":
    return None
  return jax.devices()[0].device_kind.lower()


def _cudnn_supports(dtype: jnp.dtype, head_dim: int, q_length: int, kv_length: int) -> bool:
  kind = _gpu_kind()
  if kind is None or dtype not in (jnp.bfloat16, jnp.float16):
    return False
  # Under autodiff, jax's cuDNN path (0.10 to 0.12 at least) refuses odd query or key lengths
  # ("Unsupported sequence length Q 4096, KV 77": its training check sees a bias placeholder as a
  # bias), and "auto" cannot know whether it is differentiated: CLIP's 77-token cross-attention
  # stays on XLA, self-attention over an even number of latent pixels goes to cuDNN.
  if q_length % 2 or kv_length % 2:
    return False
  max_head = 256 if ("h100" in kind or "h200" in kind or "h800" in kind) else 128
  return head_dim % 8 == 0 and head_dim <= max_head


def choose_implementation(
    requested: Implementation, dtype: jnp.dtype, head_dim: int, has_mask: bool = False, *,
    q_length: int = 0, kv_length: int = 0,
) -> str:
  """Resolves ``"auto"`` to the fastest kernel that supports these inputs.

  The choice is made when the program is traced, from the default backend: a
  program traced on a CPU host (e.g. exported for ``cuda`` with ``jax.export``)
  holds XLA attention whatever platform it is lowered for.
  """
  if requested == "auto":
    # cuDNN's flash kernel takes padding masks only as sequence lengths; with
    # an arbitrary boolean mask we stay on XLA.
    return "cudnn" if (_cudnn_supports(jnp.dtype(dtype), head_dim, q_length, kv_length) and not has_mask) else "xla"
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
      implementation, q_BxTxNxH.dtype, q_BxTxNxH.shape[-1], has_mask=mask is not None,
      q_length=q_BxTxNxH.shape[1], kv_length=k_BxSxNxH.shape[1],
  )
  if mask is not None:
    mask = jnp.asarray(mask, bool)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
  return jax.nn.dot_product_attention(
      q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, mask=mask, is_causal=is_causal, implementation=impl
  )
