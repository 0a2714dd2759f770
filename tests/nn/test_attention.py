"""What ``attention_impl="auto"`` resolves to (the GPU is stood in for: the choice is plain Python)."""

import jax.numpy as jnp
import pytest

from ldm_jax.nn import attention


def test_auto_is_xla_off_gpu():
  assert attention.choose_implementation("auto", jnp.bfloat16, 64, q_length=4096, kv_length=4096) == "xla"


@pytest.mark.parametrize("kind, dtype, head_dim, q_length, kv_length, has_mask, expected", [
    ("nvidia h100 80gb hbm3", jnp.bfloat16, 40, 4096, 4096, False, "cudnn"),  # SD 1.5 self-attention
    ("nvidia h100 80gb hbm3", jnp.bfloat16, 160, 64, 64, False, "cudnn"),  # up to 256 on Hopper
    ("nvidia a100-sxm4-80gb", jnp.bfloat16, 160, 64, 64, False, "xla"),  # 128 elsewhere
    ("nvidia h100 80gb hbm3", jnp.bfloat16, 40, 4096, 77, False, "xla"),  # CLIP context: odd, refused under grad
    ("nvidia h100 80gb hbm3", jnp.bfloat16, 40, 63 * 63, 63 * 63, False, "xla"),
    ("nvidia h100 80gb hbm3", jnp.float32, 40, 4096, 4096, False, "xla"),
    ("nvidia h100 80gb hbm3", jnp.bfloat16, 36, 4096, 4096, False, "xla"),  # head size not a multiple of 8
    ("nvidia h100 80gb hbm3", jnp.bfloat16, 40, 4096, 4096, True, "xla"),
])
def test_auto_on_a_gpu(monkeypatch, kind, dtype, head_dim, q_length, kv_length, has_mask, expected):
  monkeypatch.setattr(attention, "_gpu_kind", lambda: kind)
  got = attention.choose_implementation("auto", dtype, head_dim, has_mask, q_length=q_length, kv_length=kv_length)
  assert got == expected


def test_explicit_choice_is_kept_and_checked():
  assert attention.choose_implementation("cudnn", jnp.float32, 40) == "cudnn"
  with pytest.raises(ValueError, match="'auto', 'xla' or 'cudnn', got 'flash'"):
    attention.choose_implementation("flash", jnp.bfloat16, 40)
