"""``evaluate.run`` on folders of images with a narrow random Inception:
FID, KID, IS and precision/recall against float64 NumPy/SciPy computations
on the same features; reference statistics saved and read back."""

import json

import numpy as np
import pytest
from PIL import Image
from scipy import linalg

from ldm_jax.apps.evaluate import EvalRequest, run
from ldm_jax.evaluation import feature_metrics
from ldm_jax.interop import feature_nets

N, SIZE = 12, 32


def _write_images(folder, seed: int, brightness: float) -> np.ndarray:
  """Smooth random images (blurred noise), as uint8 PNGs; returns them."""
  folder.mkdir()
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 1, size=(N, 8, 8, 3)) * brightness
  images = np.clip(np.repeat(np.repeat(coarse, 4, 1), 4, 2) * 255 + rng.normal(0, 8, (N, SIZE, SIZE, 3)), 0, 255)
  images = images.astype(np.uint8)
  for i, image in enumerate(images):
    Image.fromarray(image).save(folder / f"{i:03d}.png")
  return images


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("folders")
  gen = _write_images(root / "gen", 0, 0.7)
  real = _write_images(root / "real", 1, 1.0)
  request = EvalRequest(images_dir=str(root / "gen"), ref_dir=str(root / "real"), metrics=["fid", "kid", "is", "pr"],
                        feature_net="random_inception", batch_size=8, save_stats=str(root / "real.npz"),
                        output=str(root / "report.json"))
  report = run(request)
  with open(root / "report.json") as f:
    assert json.load(f)["metrics"] == report["metrics"]
  # The same features, extracted here from the arrays (not the files).
  extract = feature_nets.make_feature_net("random_inception").extractor()
  return root, report, extract(gen), extract(real)


def test_fid_kid_is_pr_match_float64(folders):
  _, report, gen, real = folders
  m = report["metrics"]
  g, r = np.asarray(gen["pool"], np.float64), np.asarray(real["pool"], np.float64)
  # FID, written out.
  s1, s2 = np.cov(g, rowvar=False), np.cov(r, rowvar=False)
  fid = ((g.mean(0) - r.mean(0)) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
  assert m["fid"] == pytest.approx(fid, rel=1e-3)
  # KID: with subsets as large as the sets every subset is the whole set: one unbiased MMD^2.
  k = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 3  # noqa: E731
  kxx, kyy = k(g, g), k(r, r)
  mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (N * (N - 1)) - 2 * k(g, r).mean()
  assert m["kid_subset_size"] == N
  assert m["kid_mean"] == pytest.approx(mmd, rel=1e-3, abs=1e-6)
  assert m["kid_std"] == pytest.approx(0.0, abs=1e-6 + 1e-3 * abs(mmd))
  # Precision / recall: k = 3 nearest-neighbour balls, brute force.
  def inside(query, manifold):
    d_mm = ((manifold[:, None] - manifold[None]) ** 2).sum(-1)
    radii = np.sort(d_mm, axis=1)[:, 3]
    d_qm = ((query[:, None] - manifold[None]) ** 2).sum(-1)
    return np.mean((d_qm <= radii[None]).any(1))
  assert (m["precision"], m["recall"]) == (pytest.approx(inside(g, r)), pytest.approx(inside(r, g)))
  # IS from the same logits; the hand computation is tested in test_eval_feature_metrics.py.
  want_is = feature_metrics.inception_score(gen["logits"], splits=10)
  assert m["is_mean"] == pytest.approx(want_is[0], rel=1e-4) and m["is_std"] == pytest.approx(want_is[1], abs=1e-4)
  assert 1.0 <= m["is_mean"] <= 1008


def test_report_and_saved_statistics(folders):
  root, report, gen, real = folders
  assert report["mode"] == "folder" and report["num_generated"] == N
  assert report["reference"] == {"kind": "folder", "path": str(root / "real"), "num_images": N}
  assert report["feature_net"] == {"name": "random_inception", "weights_file": None, "weights_sha256": None}
  # FID against the saved statistics equals FID against the folder.
  again = run(EvalRequest(images_dir=str(root / "gen"), ref_stats=str(root / "real.npz"), metrics=["fid"],
                          feature_net="random_inception", batch_size=8, output=str(root / "again.json")))
  assert again["reference"]["kind"] == "stats"
  assert again["metrics"]["fid"] == pytest.approx(report["metrics"]["fid"], rel=1e-9)
