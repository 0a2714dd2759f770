"""The op-kind breakdown of a profile (``benchmarks/op_breakdown.py``) on small real programs."""

import importlib.util
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is a top-level folder, not part of the installed package

from benchmarks import op_breakdown  # noqa: E402

HAVE_TORCH = importlib.util.find_spec("torch") is not None


def _block(x, kernel, w_dense, w_qkv):
  """A convolution, a dense layer and one attention head: one op of each kind.

  The barriers keep XLA (YNNPACK fusions since jax 0.12) from fusing them into one thunk.
  """
  y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  b, h, w, c = y.shape
  tokens = jax.lax.optimization_barrier(y.reshape(b, h * w, c)) @ w_dense
  q, k, v = jax.lax.optimization_barrier([tokens @ w_qkv[i] for i in range(3)])
  with jax.named_scope("attn1"):
    scores = jnp.einsum("btc,bsc->bts", q, k) / np.sqrt(c)
    out = jnp.einsum("bts,bsc->btc", jax.nn.softmax(scores, axis=-1), v)
  return out.mean(axis=-1)


def _args():
  rng = np.random.default_rng(0)
  return (rng.standard_normal((2, 16, 16, 8), np.float32), rng.standard_normal((3, 3, 8, 32), np.float32),
          rng.standard_normal((32, 32), np.float32), rng.standard_normal((3, 32, 32), np.float32))


def test_compiled_thunks_get_their_kind():
  kinds = op_breakdown.hlo_thunk_kinds(jax.jit(_block).lower(*_args()).compile().as_text())
  found = set(kinds.values())
  assert {"conv", "dense", "attention"} <= found, kinds


def test_traced_call_is_split_by_kind():
  result = op_breakdown.ours(_block, _args(), warmup=1)
  ms = result["ms_by_kind"]
  assert set(ms) == set(op_breakdown.KINDS)
  assert ms["conv"] > 0 and ms["dense"] > 0 and ms["attention"] > 0, result
  assert result["wall_ms"] > 0 and result["top_ops"]
  # Every thunk's time is inside the call (thunks may overlap on two threads).
  assert sum(ms.values()) <= 2.5 * result["wall_ms"]


@pytest.mark.parametrize("op, kind", [
    ("aten::mkldnn_convolution", "conv"), ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::baddbmm", "attention"), ("aten::addmm", "dense"), ("aten::mm", "dense"),
    ("aten::native_group_norm", "norm_reduce"), ("aten::add", "other"), ("aten::copy_", "other"),
])
def test_torch_ops_get_their_kind(op, kind):
  assert op_breakdown.torch_kind(op) == kind


@pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed")
def test_torch_profile_is_split_by_kind():
  import torch

  conv, lin = torch.nn.Conv2d(8, 32, 3, padding=1), torch.nn.Linear(32, 32)
  x = torch.randn(2, 8, 16, 16)

  def step():
    with torch.inference_mode():
      y = lin(conv(x).flatten(2).transpose(1, 2))
      torch.nn.functional.scaled_dot_product_attention(y, y, y).sum()

  ms = op_breakdown.theirs(step, warmup=1)["ms_by_kind"]
  assert ms["conv"] > 0 and ms["dense"] > 0 and ms["attention"] > 0, ms


def test_entry_point_writes_and_rereads_its_report(tmp_path, capsys):
  out = tmp_path / "breakdown.json"
  report = op_breakdown.main(["--config", "tiny", "--batch", "1", "--workloads", "vae_decode", "--baseline", "none",
                              "--out", str(out)])
  assert report["results"]["vae_decode"]["ours"]["ms_by_kind"]["conv"] > 0
  assert "benchmarks.op_breakdown" in report["machine"]["command"]
  printed = capsys.readouterr().out
  assert op_breakdown.main(["--markdown", str(out)])["results"] == json.loads(out.read_text())["results"]
  assert "| vae_decode | conv |" in printed
