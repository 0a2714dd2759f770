"""``benchmarks/device_check.py``, the prepared GPU check: its dry run (the same code, tiny shapes, on
the CPU) writes every field; without a GPU it stops at once; its MFU and goal arithmetic."""

import importlib.util
import json
import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is a top-level folder, not part of the installed package

from benchmarks import device_check  # noqa: E402

HAVE_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "diffusers"))


def test_dry_run_writes_every_field(tmp_path):
  out = tmp_path / "check.json"
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", "benchmarks.device_check", "--dry_run", "--out", str(out)], cwd=ROOT,
                        capture_output=True, text=True)
  seconds = time.perf_counter() - start
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  table = (tmp_path / "check.md").read_text()

  assert report["dry_run"] and report["shapes"]["config"] == "micro"
  for key in ("command", "budget_s", "goals", "notes", "machine", "torch", "model_flops", "elapsed_s", "rows"):
    assert key in report, key
  assert report["machine"]["platform"] == "cpu" and report["machine"]["versions"]["jax"]
  expected = [r.name for r in device_check.plan("save_dots") if r.name not in
              {n.format(remat="save_dots") for n in device_check.DRY_SKIPS}]
  assert [r["name"] for r in report["rows"]] == expected
  for row in report["rows"]:
    assert set(row) >= set(device_check.ROW_FIELDS), row["name"]
    assert row["name"] in table
    if row["side"] == "torch" and not HAVE_TORCH:
      assert row["status"] == "skipped" and "do not import" in row["error"]
      continue
    assert row["status"] == "ok", row
    assert row["median_ms"] > 0 and row["images_per_s"] > 0 and row["flops_per_step"] > 0 and row["seconds"] > 0
    assert row["mfu"] is None and row["goal"]  # no peak for a CPU
    if row["side"] == "jax":
      assert row["attention_ran"] == "xla" and row["custom_calls"] == {}
      assert row["compile_cold_s"] > 0 and row["program_bytes"] > 0 and row["xla_flops_per_step"] > 0
      assert set(row["compile_goals_met"]) == {"cold", "warm"}
  jax_rows = [r for r in report["rows"] if r["side"] == "jax"]
  assert all(r["compile_warm_s"] > 0 and r["warm_cache_hit"] for r in jax_rows)  # the first of each workload
  print(f"dry run: {seconds:.1f} s")


def test_without_a_gpu_it_stops_at_once(tmp_path):
  out = tmp_path / "check.json"
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", "benchmarks.device_check", "--only", "step_b1", "--out", str(out)],
                        cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == device_check.NO_GPU_EXIT, proc.stderr[-3000:]
  assert "sees no GPU" in proc.stderr and "--dry_run" in proc.stderr
  assert not out.exists()
  assert time.perf_counter() - start < 60


def test_mfu_and_goals():
  shapes = device_check.FULL
  rows = [device_check.blank_row(r, shapes, "ok") for r in device_check.plan("save_dots")
          if r.name in ("train_b8", "step_b1", "torch_train_b8", "train_b16")]
  by_name = {r["name"]: r for r in rows}
  by_name["train_b8"].update(median_ms=50.0)
  by_name["torch_train_b8"].update(median_ms=100.0)
  by_name["step_b1"].update(median_ms=12.0)
  by_name["train_b16"].update(status="error", error="XlaRuntimeError: RESOURCE_EXHAUSTED")
  flops = {"unet_train/8": 18.96e12, "sampler_step/1": 1.58e12}
  device_check.credit_flops(rows, flops, "NVIDIA H100 80GB HBM3")
  for r in rows:
    device_check.meets(r)
  assert by_name["train_b8"]["mfu"] == pytest.approx(18.96e12 / 0.05 / 989e12)  # 38.3%
  assert by_name["train_b8"]["goal_met"] is False and by_name["train_b8"]["goal"] == "MFU >= 40%"
  assert by_name["torch_train_b8"]["mfu"] == pytest.approx(by_name["train_b8"]["mfu"] / 2)
  assert by_name["step_b1"]["goal_met"] is True  # 12 ms < 15 ms
  assert by_name["train_b16"]["mfu"] is None and by_name["train_b16"]["goal_met"] is None
  table = device_check.markdown(dict(
      rows=rows, machine={}, shapes=dict(config="sd15", image_size=512, steps=50, dtype="bfloat16"), torch=None,
      dry_run=False, command="python -m benchmarks.device_check", elapsed_s=1.0, budget_s=480.0, notes=[]))
  assert "| train_b8 | jax | 8 | none | auto → - |" in table and "**no**" in table and "RESOURCE_EXHAUSTED" in table
