"""Evaluation as a command and during training, end to end on the shapes data.

The suite's shared tiny text-to-image run (4 steps, periodic FID hook on;
``tiny_txt2img_run`` in conftest); then ``evaluate.run`` samples the same
images from its checkpoint and saves them.
Both FIDs are checked against a float64 NumPy/SciPy computation written
here, on judge features of the saved images. The feature network is the shapes judge
with random weights (a file the test writes): its numbers are meaningless,
which does not matter for agreement.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import linalg

from ldm_jax.apps.evaluate import EvalRequest, run
from ldm_jax.evaluation.shapes_judge import ShapesJudge
from ldm_jax.interop import feature_nets

pytestmark = pytest.mark.slow  # a training run, then sampling from its checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM, BATCH, STEPS, GUIDANCE = 16, 8, 4, 3.0


def fid64(a, b) -> float:
  """The Fréchet distance written out in float64 (reference for our pipeline)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  offset = np.eye(len(mu1)) * 1e-6  # the samples are fewer than the dimensions: regularise both sides alike
  root = linalg.sqrtm((s1 + offset) @ (s2 + offset)).real
  return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root))


@pytest.fixture(scope="module")
def setup(tiny_txt2img_run, tmp_path_factory):
  run = tiny_txt2img_run
  return run["config"], run["workdir"], run["judge"], run["judge_params"], tmp_path_factory.mktemp("eval")


def test_hook_logs_fid_next_to_the_loss(setup):
  _, workdir, *_ = setup
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  fids = {r["step"]: r["eval/fid"] for r in records if "eval/fid" in r}
  assert sorted(fids) == [2, 4]
  assert all(np.isfinite(v) and v > 0 for v in fids.values())
  assert any("loss" in r for r in records)


@pytest.fixture(scope="module")
def report(setup):
  config, workdir, judge, _, root = setup
  request = EvalRequest(checkpoint=workdir, metrics=["fid", "kid", "pr"], num_samples=NUM, batch_size=BATCH,
                        steps=STEPS, guidance=GUIDANCE, feature_net="shapes_judge", judge_weights=judge,
                        guidance_interval=["0", "1000"],  # holds every step: the hook's samples (compared below)
                        kid_subset_size=8, save_stats=str(root / "ref.npz"), save_images=str(root / "samples"),
                        output=str(root / "report.json"),
                        command=["evaluate.py", "--test"])
  run(request)
  with open(root / "report.json") as f:
    return json.load(f)


def test_report_has_what_reproduces_it(setup, report):
  _, workdir, judge, _, _ = setup
  assert report["mode"] == "samples" and report["command"] == ["evaluate.py", "--test"]
  assert report["checkpoint"] == {"path": os.path.abspath(workdir), "step": 4}
  s = report["sampling"]
  assert (s["sampler"]["sampler"], s["sampler"]["num_steps"], s["guidance_scale"], s["eta"], s["seed"]) == (
      "ddim", STEPS, GUIDANCE, 0.0, 0)
  assert s["sampler"]["guidance_interval"] == [0.0, 1000.0]
  assert s["num_samples"] == NUM and s["conditions"] == "split_captions"
  assert report["reference"]["split"] == "validation" and report["reference"]["num_images"] == 32
  assert report["feature_net"]["weights_sha256"] == feature_nets.file_sha256(judge)
  assert {"jax", "flax", "numpy"} <= set(report["versions"])
  assert report["num_generated"] == NUM
  assert set(report["metrics"]) >= {"fid", "kid_mean", "kid_std", "precision", "recall"}
  assert 0.0 <= report["metrics"]["precision"] <= 1.0


@pytest.fixture(scope="module")
def reference_features(setup, report):
  """Judge features, on one device, of the eval split and of the samples evaluate.py saved."""
  config, _, _, params, root = setup
  from ldm_jax.evaluation.image_sources import split_batches

  apply = jax.jit(lambda x: ShapesJudge().apply(params, x.astype(jnp.float32) / 127.5 - 1.0)[2])
  batches = list(split_batches(config.data, "validation", batch_size=BATCH))
  real = np.concatenate([np.asarray(apply(np.round((b["image"] + 1) * 127.5).astype(np.uint8))) for b in batches])
  saved = [np.asarray(Image.open(root / "samples" / f"{i:05d}.png")) for i in range(NUM)]
  with open(root / "samples" / "conditions.txt") as f:
    prompts = f.read().splitlines()
  captions = [str(c) for b in batches for c in b["caption"]]
  assert prompts == captions[:NUM]  # samples are conditioned on the split's captions, in order
  return real, np.asarray(apply(np.stack(saved)))


def test_fid_matches_float64_reference(setup, report, reference_features):
  _, workdir, _, _, root = setup
  real, gen = reference_features
  want = fid64(gen, real)
  assert report["metrics"]["fid"] == pytest.approx(want, rel=2e-3)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    hook_fid = [json.loads(line)["eval/fid"] for line in f if "eval/fid" in line][-1]
  assert hook_fid == pytest.approx(want, rel=2e-3)  # the hook ran on the same (final-step EMA) weights
  with np.load(root / "ref.npz") as stats:
    np.testing.assert_allclose(stats["mu"], real.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats["sigma"], np.cov(np.asarray(real, np.float64), rowvar=False),
                               rtol=1e-3, atol=1e-5)


def test_bad_inputs_name_the_problem(setup, tmp_path):
  _, workdir, judge, _, _ = setup
  with pytest.raises(ValueError, match=r"unknown metric\(s\) \['fdi'\]"):
    EvalRequest(checkpoint=workdir, metrics=["fdi"]).validate()
  with pytest.raises(ValueError, match="rfid.*stage-1"):
    run(EvalRequest(checkpoint=workdir, metrics=["rfid"], output=str(tmp_path / "r.json")))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match="holds no images"):
    run(EvalRequest(images_dir=str(empty), ref_dir=str(empty), feature_net="shapes_judge", judge_weights=judge,
                    image_size=32, output=str(tmp_path / "r.json")))
  with pytest.raises(ValueError, match="--guidance_interval needs 0 <= LOW <= HIGH, got 900,100"):
    EvalRequest(checkpoint=workdir, guidance_interval=["900", "100"]).validate()
  with pytest.raises(ValueError, match="only mean and covariance"):
    EvalRequest(images_dir=str(empty), ref_stats=judge, metrics=["kid"]).validate()
  # The command line: a missing weights file names the flag and the converter.
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "evaluate.py"), f"--images_dir={empty}", "--inception_weights=nope.npz"],
      capture_output=True, text=True, cwd=str(tmp_path), env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode != 0
  assert "--inception_weights file not found: nope.npz" in out.stderr
  assert "python -m ldm_jax.interop.inception --convert" in out.stderr
