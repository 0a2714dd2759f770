"""Benchmark suite: step times, compile times, FLOPs and MFU of ldm_jax, next to a PyTorch baseline.

Run from the repository root: ``python -m benchmarks.run --help``.
"""
