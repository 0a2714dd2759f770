"""Smoke tests of benchmarks/loop_overhead.py and benchmarks/input_pipeline.py: well-formed results at tiny
sizes, never timings (each runs in its own process, as from the command line)."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is a top-level folder, not part of the installed package

from benchmarks.input_pipeline import SYSTEMS, needs  # noqa: E402


def _run(module: str, argv: list[str]) -> subprocess.CompletedProcess:
  proc = subprocess.run([sys.executable, "-m", module, *argv], cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_loop_overhead_writes_well_formed_json(tmp_path):
  out = tmp_path / "loop.json"
  proc = _run("benchmarks.loop_overhead", ["--steps", "12", "--repeats", "1", "--save-mb", "0.1", "--saves", "1",
                                           "--out", str(out)])
  report = json.loads(out.read_text())
  assert report["machine"]["command"].startswith("python -m benchmarks.loop_overhead --steps 12")
  rows = {r["name"]: r for r in report["results"]}
  assert list(rows)[0] == "bare" and len(rows) == 4 and rows["bare"]["overhead_us_per_step"] == 0
  for row in rows.values():
    assert row["steps_per_s"] == pytest.approx(1e6 / row["us_per_step"]) and row["cpu_us_per_step"] > 0
    assert len(row["times_s"]) == 1
  assert len(report["saves"]) == 1 and 0 < report["saves"][0]["blocked_s"] <= report["saves"][0]["on_disk_s"]
  assert "| bare |" in proc.stdout


def test_input_pipeline_writes_well_formed_json(tmp_path):
  out = tmp_path / "input.json"
  proc = _run("benchmarks.input_pipeline", [
      "--num-images", "4", "--source-size", "80x60", "--image-size", "32", "--batch", "2", "--batches", "2",
      "--warmup", "1", "--workers", "0", "--latent-records", "4", "--latent-size", "8", "--out", str(out)])
  report = json.loads(out.read_text())
  paths = [(r["path"], r["dtype"], r["workers"]) for r in report["results"]]
  assert paths == [("jpeg via folder", "uint8 -> float32", 0), ("jpeg via array_record", "uint8 -> float32", 0),
                   ("latents via array_record", "float16 -> float32", 0),
                   ("latents via array_record", "float32 -> float32", 0)]
  assert all(r["images_per_s"] > 0 and r["images_per_cpu_s"] > 0 for r in report["results"])
  assert report["settings"]["mean_jpeg_bytes"] > 0
  assert len(report["needs"]) == 2 * len(SYSTEMS) and "| 8x H100 SXM | jpeg |" in proc.stdout


def test_input_needs_are_arithmetic_on_flop_counts():
  flops = {"flops": [dict(workload="unet_train", flops_per_image=2e12),
                     dict(workload="vae_encode", flops_per_image=1e12)]}
  rows = [dict(path="jpeg via array_record", dtype="uint8 -> float32", workers=0, images_per_cpu_s=50.0),
          dict(path="jpeg via array_record", dtype="uint8 -> float32", workers=1, images_per_cpu_s=40.0),
          dict(path="jpeg via folder", dtype="uint8 -> float32", workers=1, images_per_cpu_s=9e9),
          dict(path="latents via array_record", dtype="float32 -> float32", workers=0, images_per_cpu_s=9e9),
          dict(path="latents via array_record", dtype="float16 -> float32", workers=0, images_per_cpu_s=1000.0)]
  got = {(r["system"], r["path"]): r for r in needs(flops, rows)}
  h100 = got[("8x H100 SXM", "jpeg")]
  assert h100["images_per_s_needed"] == pytest.approx(8 * 989e12 * 0.4 / 3e12)
  assert h100["cores_needed"] == pytest.approx(8 * 989e12 * 0.4 / 3e12 / 50.0)  # the best rate per CPU-second
  assert h100["cores_needed_workers"] == pytest.approx(8 * 989e12 * 0.4 / 3e12 / 40.0)  # the best with workers
  v5p = got[("TPU v5p host (4 chips)", "latents (float16)")]
  assert v5p["cores_needed"] == pytest.approx(4 * 459e12 * 0.4 / 2e12 / 1000.0)
  assert v5p["cores_needed_workers"] is None
