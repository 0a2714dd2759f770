"""Smoke tests of the benchmark harness (``benchmarks/``): well-formed results, never timings."""

import dataclasses
import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is a top-level folder, not part of the installed package

from benchmarks import lowering, workloads  # noqa: E402
from benchmarks.compilation import flops  # noqa: E402
from benchmarks.configs import get_config, unet_fields, vae_ddconfig  # noqa: E402
from benchmarks.measure import workload_flops  # noqa: E402
from benchmarks.peaks import mfu, peak_flops  # noqa: E402
from benchmarks.report import markdown  # noqa: E402
from benchmarks.settings import Settings  # noqa: E402
from benchmarks.targets import target_rows  # noqa: E402
from benchmarks.workloads import Models  # noqa: E402
from ldm_jax.models.unet import UNetModel, unet_preset  # noqa: E402

HAVE_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "diffusers"))


def _fields(module: UNetModel) -> dict:
  skip = {"image_size", "parent", "name"}
  return {f.name: getattr(module, f.name) for f in dataclasses.fields(module) if f.name not in skip}


@pytest.mark.parametrize("config, preset", [("sd15", "sd_v1"), ("sd2", "sd_v2")])
def test_benchmark_configs_are_the_sd_presets(config, preset):
  assert _fields(UNetModel(**unet_fields(get_config(config)))) == _fields(UNetModel(**unet_preset(preset)))


def test_peak_table():
  assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert peak_flops("NVIDIA H100 PCIe") == 756e12
  assert peak_flops("TPU v5 lite") == 197e12
  assert peak_flops("cpu") is None
  assert mfu(1e12, 0.01, 1e15) == pytest.approx(0.1)
  assert mfu(None, 0.01, 1e15) is None and mfu(1e12, 0.01, None) is None


class _Stage:
  def __init__(self, analysis):
    self.analysis = analysis

  def cost_analysis(self):
    if isinstance(self.analysis, Exception):
      raise self.analysis
    return self.analysis


def test_flops_reads_every_cost_analysis_shape():
  assert flops(_Stage({"flops": 12.0})) == 12.0
  assert flops(_Stage([{"flops": 7.0}])) == 7.0  # older jax: one dict per program
  assert flops(_Stage([])) is None
  assert flops(_Stage({"flops": -1.0})) is None
  assert flops(_Stage(NotImplementedError())) is None


@pytest.fixture(scope="module")
def tiny_models() -> Models:
  """Shapes only: lowering full programs from them costs no compilation."""
  return Models(Settings(config="tiny", batch=1, image_size=64, steps=3), abstract=True)


def test_sampler_flops_count_every_step(tiny_models):
  """XLA counts a scan body once; the harness adds the other steps' guided UNet calls."""
  sampler = workloads.sampler(tiny_models)
  lowered = jax.jit(sampler.fn).lower(*sampler.args)
  whole, total = flops(lowered), workload_flops(sampler, lowered)
  decode = workload_flops(workloads.vae_decode(tiny_models))
  one_step = workload_flops(workloads.sampler_step(tiny_models))  # a separate program: guided UNet + DDIM update
  assert decode > 0 and one_step > 0
  assert whole == pytest.approx(one_step + decode, rel=0.01)  # what XLA sees: one scan trip + the decode
  assert total == pytest.approx(3 * one_step + decode, rel=0.01)  # what a call does: N trips + the decode


@pytest.mark.skipif(not HAVE_TORCH, reason="torch and diffusers are not installed")
def test_both_sides_build_the_same_architecture(tiny_models):
  """The diffusers modules of the baseline hold exactly as many parameters as ours."""
  from diffusers import AutoencoderKL, UNet2DConditionModel

  config = get_config("tiny")
  count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))  # noqa: E731
  torch_count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
  assert count(tiny_models.unet_params) == torch_count(UNet2DConditionModel(**config.unet))
  assert count(tiny_models.vae_params) == torch_count(AutoencoderKL(**config.vae))


def test_sd_vae_is_the_reference_kl_f8():
  from configs.ldm import KL_F8

  ours = vae_ddconfig(get_config("sd15"))
  # resolution and dropout (0) do not change the computation; 32 groups is the modules' default.
  reference = {k: v for k, v in KL_F8["ddconfig"].items() if k not in ("resolution", "dropout")}
  assert ours == {**reference, "norm_num_groups": 32}


def test_harness_writes_well_formed_json(tmp_path):
  out = tmp_path / "results.json"
  argv = ["--config", "tiny", "--workloads", "vae_encode,vae_decode", "--batch", "1", "--image-size", "64",
          "--repeats", "2", "--baseline", "torch" if HAVE_TORCH else "none", "--out", str(out)]
  # Its own process: the harness turns on the persistent compilation cache.
  proc = subprocess.run([sys.executable, "-m", "benchmarks.run", *argv], cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())

  assert report["machine"]["cores"] >= 1 and report["machine"]["versions"]["jax"]
  assert report["machine"]["command"].endswith(" ".join(argv[-2:]))
  assert len(report["machine"]["load_average"]) == 3 and len(report["load_average_end"]) == 3
  assert report["settings"]["batch"] == 1 and report["settings"]["image_size"] == 64
  assert [r["workload"] for r in report["results"]] == ["vae_encode", "vae_decode"]
  for entry in report["results"]:
    ours = entry["ours"]
    assert len(ours["times_s"]) == 2
    for key in ("compile_cold_s", "compile_warm_s", "median_s", "images_per_s", "flops_per_step", "flop_per_s"):
      assert ours[key] > 0, key
    assert ours["warm_cache_hit"] and not ours["cold_cache_hit"]
    assert ours["mfu"] is None and ours["peak_device_bytes"] is None  # CPU
    assert ours["cpu_over_wall"] > 0
    if HAVE_TORCH:
      assert entry["ours_over_ref"] == pytest.approx(ours["median_s"] / entry["ref"]["median_s"])
      assert entry["ref"]["flops_per_step"] == ours["flops_per_step"]
  assert "ours/ref" in proc.stdout
  assert markdown(report).count("| vae_decode |") == (2 if HAVE_TORCH else 1)


def test_targets_are_arithmetic_on_flop_counts():
  report = dict(settings=dict(config="sd15", image_size=512, steps=50),
                flops=[dict(workload=n, flops_per_image=f) for n, f in
                       (("unet_train", 2e12), ("sampler", 80e12), ("sampler_step", 1.5e12))])
  rows = {r["workload"]: r for r in target_rows(report)}
  assert rows["unet_train"]["seconds"] == pytest.approx(8 * 2e12 / (0.40 * 989e12))
  assert rows["sampler"]["seconds"] == pytest.approx(8 * 80e12 / (0.45 * 989e12))
  assert rows["sampler_step"]["mfu"] == pytest.approx(1.5e12 / 0.015 / 989e12)


def test_lowering_for_tpu_and_cuda_and_on_a_stand_in_h100():
  """benchmarks/lowering.py on the two-level config: both platforms lower; traced as on an H100, "auto"
  puts self-attention on cuDNN and keeps the 77-token cross-attention on XLA (cuDNN refuses it under grad)."""
  settings = Settings(config="micro", batch=1, image_size=16, steps=2, dtype="bfloat16")
  rows = lowering.lower(settings, "sampler", [("tpu",), ("tpu", "cuda")], stand_in=False)
  assert [r["lowered"] for r in rows] == [True, True], [r["error"] for r in rows]
  assert rows[0]["ops"]["stablehlo.while"] == 1 and rows[0]["custom_calls"] == {}
  assert rows[1]["ops"]["stablehlo.case"] > rows[0]["ops"].get("stablehlo.case", 0)  # per-platform branches
  train = lowering.lower(settings, "unet_train", [("cuda",)], stand_in=True)[0]
  assert train["lowered"], train["error"]
  assert train["attention_ran"] == "cudnn" and set(train["custom_calls"]) == set(lowering.CUDNN_TARGETS[:2])
  table = lowering.markdown(dict(settings=dataclasses.asdict(settings), rows=[*rows, train],
                                 machine=dict(command="c", cpu="cpu", cores=1, versions=dict(jax="0"), git=None)))
  assert table.count("| yes |") == 3 and "`__cudnn$fmhaSoftmaxBackward` ×" in table
