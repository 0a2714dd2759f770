"""reconstruct.py: a folder of images (one of them corrupt) through a saved
first stage; the reported PSNR is recomputed from the files it wrote."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ldm_jax.interop.load import load_first_stage
from ldm_jax.models.first_stage import make_first_stage
from ldm_jax.training.first_stage_io import save_first_stage

REPO = pathlib.Path(__file__).parents[2]
SIZE = 32
MODEL = dict(kind="kl", embed_dim=3, n_embed=0, ddconfig=dict(
    double_z=True, z_channels=3, resolution=SIZE, ch=8, ch_mult=[1, 2], num_res_blocks=1,
    attn_resolutions=[], attn_type="none", norm_num_groups=4,
))


def random_params(model, rng: np.random.Generator):
  """Weights drawn on the host (nothing to compile): any weights will do."""
  x = jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32)
  shapes = jax.eval_shape(lambda k, x: model.init(k, x, sample_posterior=False), jax.random.key(0), x)["params"]
  return jax.tree_util.tree_map_with_path(
      lambda path, s: (np.ones(s.shape) if path[-1].key == "scale" else rng.normal(0, 0.2, s.shape)).astype(np.float32),
      shapes,
  )


def smooth_image(rng, height, width) -> np.ndarray:
  yy, xx = np.mgrid[:height, :width] / max(height, width)
  channels = [np.sin(rng.uniform(2, 6) * xx + rng.uniform(1, 4) * yy + rng.uniform(0, 6)) for _ in range(3)]
  return np.round((np.stack(channels, -1) + 1) * 127.5).astype(np.uint8)


def center_crop(image: Image.Image, size: int) -> np.ndarray:
  """Shorter side to ``size`` (bicubic), then the centre square."""
  w, h = image.size
  scale = size / min(w, h)
  new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
  if (new_w, new_h) != (w, h):
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return np.asarray(image.convert("RGB"))[top: top + size, left: left + size]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  root = tmp_path_factory.mktemp("reconstruct")
  model = make_first_stage(MODEL)
  params = random_params(model, np.random.default_rng(0))
  save_first_stage(root / "run", params, MODEL, scale_factor=0.5)
  images = root / "images"
  rng = np.random.default_rng(1)
  (images / "a").mkdir(parents=True)
  (images / "sub").mkdir()
  Image.fromarray(smooth_image(rng, SIZE, SIZE)).save(images / "a" / "x.png")
  Image.fromarray(smooth_image(rng, 40, 48)).save(images / "b.jpg", quality=95)  # resized and cropped
  Image.fromarray(smooth_image(rng, SIZE, SIZE)).save(images / "sub" / "c.png")
  (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
  (images / "notes.txt").write_text("not an image file: ignored")
  return dict(root=root, params=params, images=images)


def test_save_and_load_first_stage_round_trip(saved):
  model, variables, scale, config = load_first_stage(saved["root"] / "run")
  assert scale == 0.5 and config["ddconfig"]["ch"] == 8 and model == make_first_stage(MODEL)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables["params"]), saved["params"])


def test_reconstruct_command_reports_psnr_of_what_it_wrote(saved):
  out = saved["root"] / "out"
  cmd = [sys.executable, "reconstruct.py", "--checkpoint", str(saved["root"] / "run"), "--input",
         str(saved["images"]), "--output", str(out), f"--size={SIZE}", "--batch_size=2"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((out / "psnr.json").read_text())

  assert sorted(report["psnr"]) == ["a/x.png", "b.jpg", "sub/c.png"]
  assert [s["path"] for s in report["skipped"]] == ["corrupt.png"] and "cannot decode" in report["skipped"][0]["error"]
  assert "skipped corrupt.png" in proc.stdout
  for rel, reported in report["psnr"].items():
    written = np.asarray(Image.open(out / (os.path.splitext(rel)[0] + ".png")), np.float64)
    original = center_crop(Image.open(saved["images"] / rel), SIZE).astype(np.float64)
    assert written.shape == original.shape == (SIZE, SIZE, 3)
    expected = 10 * np.log10(255.0**2 / np.mean((written - original) ** 2))
    np.testing.assert_allclose(reported, expected, atol=1e-3)
  mean = np.mean(list(report["psnr"].values()))
  np.testing.assert_allclose(report["mean_psnr"], mean, atol=1e-9)
  assert f"mean PSNR {mean:.2f} dB" in proc.stdout


def test_reconstruct_errors_name_the_problem(saved, tmp_path):
  from ldm_jax.apps.reconstruct import reconstruct_folder

  with pytest.raises(ValueError, match="image_size 31 is not a multiple of 2"):
    reconstruct_folder(str(saved["root"] / "run"), str(saved["images"]), str(tmp_path), size=31)
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="holds no images"):
    reconstruct_folder(str(saved["root"] / "run"), str(tmp_path / "empty"), str(tmp_path), size=SIZE)
