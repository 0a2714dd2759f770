"""Peak dense matmul throughput per accelerator, for model FLOP utilisation (MFU).

Dense (no 2:4 sparsity) bf16 / fp16 tensor-core peaks from the vendors' data
sheets, in FLOP/s. float32 compute is compared against the same bf16 peak
(it is what the chip could do in the recommended precision). CPUs have no
entry: their results report FLOP/s only.
"""

import jax

# Matched in order against the lower-cased ``device.device_kind``.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # SXM
    ("h200", 989e12),
    ("h800", 989e12),
    ("a100", 312e12),
    ("l4", 121e12),
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),
    ("tpu v6 lite", 918e12),  # v6e (Trillium)
    ("tpu v6e", 918e12),
)


def peak_flops(device_kind: str) -> float | None:
  """Peak bf16 FLOP/s of one chip of this kind, or None (CPU, unknown chip)."""
  kind = device_kind.lower()
  for key, peak in PEAK_BF16_FLOPS:
    if key in kind:
      return peak
  return None


def device_peak_flops(device: jax.Device | None = None) -> float | None:
  device = device or jax.devices()[0]
  return None if device.platform == "cpu" else peak_flops(device.device_kind)


def mfu(flops_per_step: float | None, seconds_per_step: float, peak: float | None) -> float | None:
  """Fraction of the chip's peak the step achieves (None without a peak or FLOP count)."""
  if not flops_per_step or not peak or seconds_per_step <= 0:
    return None
  return flops_per_step / seconds_per_step / peak
