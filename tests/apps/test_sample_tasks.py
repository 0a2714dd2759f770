"""sample.py drives every conditioning task from files, end to end on tiny random-weight models
(``tiny_conditional_ldms``: orbax pipeline folders, loaded as ``--checkpoint``): super-resolution
(with image-space guidance), inpainting models, semantic synthesis, layout-to-image,
class-conditional sampling above the training size; and every bad file is one named error.

``SampleRequest.validate`` + ``run`` are what ``sample.py``'s ``main`` calls. Loading a folder
traces its model's weight shapes (seconds), so the module loads each folder once, onto one
device as sample.py usually runs (the suite's 8 CPU devices would pad every batch to 8 images).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from tiny_conditional_ldms import LATENT, NUM_CLASSES, SEG_CLASSES, SIZE, write_pipeline

from ldm_jax.apps import sample as sample_app
from ldm_jax.apps.sample import SampleRequest, run
from ldm_jax.interop.load import load_pipeline
from ldm_jax.parallel.mesh import data_parallel_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 2


@pytest.fixture(scope="module", autouse=True)
def loaded_once():
  cache = {}
  real = sample_app.load_pipeline

  def load(path, **kw):
    key = (path, tuple(sorted(kw.items())))
    if key not in cache:
      cache[key] = real(path, mesh=data_parallel_mesh(jax.devices()[:1]), **kw)
    return cache[key]

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(sample_app, "load_pipeline", load)
    yield


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp("models")
  made = {}

  def get(kind):
    if kind not in made:
      made[kind] = write_pipeline(root, kind)
    return made[kind]

  return get


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Conditioning files: smooth random images, label maps, layouts, masks."""
  root = tmp_path_factory.mktemp("inputs")
  rng = np.random.default_rng(0)
  out = {}

  def blocks(shape, block, high=256, dtype=np.uint8):
    small = rng.integers(0, high, (shape[0] // block, shape[1] // block, *shape[2:])).astype(dtype)
    return np.repeat(np.repeat(small, block, axis=0), block, axis=1)

  def save(name, array, mode=None):
    out[name] = str(root / name)
    Image.fromarray(array, mode).save(out[name])

  for name in ("low_a.png", "low_b.png"):
    save(name, blocks((LATENT, LATENT, 3), 2))
  save("init.png", blocks((SIZE, SIZE, 3), 4))
  for name, (rows, cols) in (("mask_a.png", (slice(0, 16), slice(0, 16))), ("mask_b.png", (slice(16, 32),) * 2)):
    hole = np.zeros((SIZE, SIZE), np.uint8)
    hole[rows, cols] = 255
    save(name, hole, "L")
  for name in ("seg_a.png", "seg_b.png"):
    save(name, blocks((SIZE, SIZE), 8, SEG_CLASSES), "L")
  save("seg_out_of_range.png", np.full((SIZE, SIZE), SEG_CLASSES + 2, np.uint8), "L")
  save("seg_rgb.png", blocks((SIZE, SIZE, 3), 8, SEG_CLASSES))
  save("seg_odd.png", blocks((SIZE - 2, SIZE - 2), 2, SEG_CLASSES), "L")
  layouts = {"layout_a.json": {"boxes": [[0.1, 0.1, 0.6, 0.5]], "labels": [3]},
             "layout_b.json": {"boxes": [[0.5, 0.4, 0.9, 0.9], [0.0, 0.6, 0.3, 0.9]], "labels": [7, 1]},
             "layout_bad_label.json": {"boxes": [[0.1, 0.1, 0.6, 0.5]], "labels": [10]},
             "layout_bad_box.json": {"boxes": [[0.6, 0.1, 0.1, 1.5]], "labels": [1]},
             "layout_mismatch.json": {"boxes": [[0.1, 0.1, 0.6, 0.5]], "labels": [1, 2]}}
  for name, layout in layouts.items():
    out[name] = str(root / name)
    with open(out[name], "w") as f:
      json.dump(layout, f)
  out["layout_broken.json"] = str(root / "layout_broken.json")
  with open(out["layout_broken.json"], "w") as f:
    f.write('{"boxes": [[0.1, 0.1, 0.6')
  out["not_an_image.png"] = str(root / "not_an_image.png")
  with open(out["not_an_image.png"], "w") as f:
    f.write("not an image")
  return out


def _sample(tmp_path, name, **kw) -> np.ndarray:
  """Runs sample.py's request; returns the images it wrote, (N, H, W, 3) uint8."""
  request = SampleRequest(**{"steps": STEPS, **kw}, output=str(tmp_path / name))
  request.validate()
  paths = run(request)
  assert os.path.isfile(os.path.join(request.output, "grid.png"))
  return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


def _differ(a, b) -> float:
  return float(np.abs(a.astype(int) - b.astype(int)).mean())


def _down(images: np.ndarray, size: int) -> np.ndarray:
  """uint8 images in [-1, 1], bicubically downsampled as super-resolution training data is."""
  x = images.astype(np.float32) / 127.5 - 1.0
  return np.asarray(jax.image.resize(x, (x.shape[0], size, size, 3), "cubic"))


def test_super_resolution_upsamples_the_low_res_image(models, files, tmp_path):
  ckpt = models("super_resolution")
  a = _sample(tmp_path, "a", checkpoint=ckpt, low_res=files["low_a.png"], num=2)
  b = _sample(tmp_path, "b", checkpoint=ckpt, low_res=files["low_b.png"], num=2)
  assert a.shape == b.shape == (2, SIZE, SIZE, 3)  # the model's factor, 4, times the 8x8 input
  assert _differ(a, b) > 2.0  # the low-res image is used
  assert _differ(a[0], a[1]) > 2.0  # and each image has its own noise


def test_image_guidance_pulls_the_output_towards_the_low_res_image(models, files, tmp_path):
  """--image_guidance low_res: the decoded x0's bicubic downsampling is pulled towards the
  input at every step, so the output's downsampling lies closer to it than unguided samples'."""
  ckpt = models("super_resolution")
  common = dict(checkpoint=ckpt, low_res=files["low_a.png"], num=2)  # run a's program: no new compile
  target = np.asarray(Image.open(files["low_a.png"]).convert("RGB"), np.float32)[None] / 127.5 - 1.0
  plain = _sample(tmp_path, "plain", **common)
  guided = _sample(tmp_path, "guided", image_guidance="low_res", image_guidance_strength=20.0, **common)
  err_plain = np.abs(_down(plain, LATENT) - target).mean()
  err_guided = np.abs(_down(guided, LATENT) - target).mean()
  # Measured 0.51 vs 0.58 (ratio 0.89, the same from strength 20 to 1000: the tiny random decoder
  # can only get so close, and with 2 steps only the first is guided noticeably). Guidance of the
  # wrong sign pushes the error up instead.
  assert err_guided < 0.95 * err_plain, (err_guided, err_plain)
  with open(tmp_path / "guided" / "samples.json") as f:
    record = json.load(f)[0]
  assert (record["image_guidance"], record["image_guidance_strength"]) == ("low_res", 20.0)


def test_inpainting_model_takes_mask_and_masked_image(models, files, tmp_path):
  ckpt = models("inpainting")
  a = _sample(tmp_path, "a", checkpoint=ckpt, init_image=files["init.png"], mask=files["mask_a.png"])
  b = _sample(tmp_path, "b", checkpoint=ckpt, init_image=files["init.png"], mask=files["mask_b.png"])
  assert a.shape == b.shape == (1, SIZE, SIZE, 3)
  assert _differ(a, b) > 2.0  # the mask reaches the model (its concat input)


def test_semantic_synthesis_follows_the_label_map(models, files, tmp_path):
  ckpt = models("semantic")
  a = _sample(tmp_path, "a", checkpoint=ckpt, segmentation=files["seg_a.png"])
  b = _sample(tmp_path, "b", checkpoint=ckpt, segmentation=files["seg_b.png"])
  assert a.shape == b.shape == (1, SIZE, SIZE, 3)  # the label map's size
  assert _differ(a, b) > 2.0


def test_layout_to_image_follows_the_layout(models, files, tmp_path):
  ckpt = models("layout")
  a = _sample(tmp_path, "a", checkpoint=ckpt, layout=files["layout_a.json"], guidance=2.0)
  b = _sample(tmp_path, "b", checkpoint=ckpt, layout=files["layout_b.json"], guidance=2.0)
  assert a.shape == b.shape == (1, SIZE, SIZE, 3)
  assert _differ(a, b) > 2.0


def test_class_labels_at_a_size_above_the_training_size(models, tmp_path):
  """Convolutional sampling: a 2x taller, 1.5x wider output than the 32x32 training size (the
  latent grid follows), with each label its own image."""
  big = _sample(tmp_path, "big", checkpoint=models("class"), class_labels=[1, 2], guidance=2.0, height=2 * SIZE,
                width=48)
  assert big.shape == (2, 2 * SIZE, 48, 3) and big.std() > 1.0
  assert _differ(big[0], big[1]) > 2.0


@pytest.mark.parametrize("kind, kw, message", [
    ("class", dict(class_labels=[1], low_res="low_a.png"),
     "--low_res does not apply: this model is conditioned on class labels"),
    ("class", dict(class_labels=[NUM_CLASSES]), f"--class_label {NUM_CLASSES} is out of range: this model has "
     f"classes 0..{NUM_CLASSES - 1}"),
    ("class", dict(class_labels=[1], segmentation="seg_a.png"), "--segmentation does not apply"),
    ("super_resolution", dict(), "conditioned on a low-resolution image .*: give --low_res"),
    ("super_resolution", dict(low_res="low_a.png", layout="layout_a.json"), "--layout does not apply"),
    ("super_resolution", dict(low_res="low_a.png", height=48), "--low_res '.*low_a.png' is 8x8, so the output is "
     "32x32, but --height/--width ask for 32x48"),
    ("semantic", dict(segmentation="seg_out_of_range.png"), "--segmentation '.*seg_out_of_range.png' holds labels "
     f"7..7; this model has classes 0..{SEG_CLASSES - 1}"),
    ("semantic", dict(segmentation="seg_odd.png"), "--segmentation '.*seg_odd.png' is 30x30: .* multiples of the "
     "latent factor 4"),
    ("layout", dict(layout="layout_bad_label.json"), "--layout '.*layout_bad_label.json': label 10 is out of range"),
    ("inpainting", dict(), "conditioned on a mask and a masked image .*: give --init_image IMAGE and --mask MASK"),
    ("layout", dict(prompts=["a cat"], layout="layout_a.json"), "--prompt/--prompts_file does not apply"),
])
def test_a_condition_the_model_cannot_use_or_lacks_is_named(models, files, tmp_path, kind, kw, message):
  kw = {k: files.get(v, v) if isinstance(v, str) else v for k, v in kw.items()}
  with pytest.raises(ValueError, match=message):
    _sample(tmp_path, "out", checkpoint=models(kind), **kw)
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("kw, message", [
    (dict(low_res="missing.png"), "--low_res 'missing.png' does not exist"),
    (dict(low_res="not_an_image.png"), "--low_res '.*not_an_image.png' is not an image PIL can read"),
    (dict(segmentation="seg_rgb.png"), "--segmentation '.*seg_rgb.png' is a RGB image; a label map is one channel"),
    (dict(layout="layout_broken.json"), "--layout '.*layout_broken.json' is not valid JSON"),
    (dict(layout="layout_bad_box.json"), r"--layout '.*layout_bad_box.json': box 0 is \[0.6, 0.1, 0.1, 1.5\]"),
    (dict(layout="layout_mismatch.json"), "boxes and labels must be lists of one length, got 1 boxes and 2 labels"),
    (dict(image_guidance="low_res", image_guidance_strength=1.0), "--image_guidance low_res needs --low_res"),
    (dict(image_guidance="colour"), "unknown --image_guidance 'colour'; allowed: low_res"),
    (dict(low_res="low_a.png", image_guidance="low_res", image_guidance_strength=-1.0),
     "--image_guidance_strength must be a finite number >= 0"),
])
def test_bad_files_are_refused_before_loading(files, tmp_path, kw, message):
  kw = {k: files.get(v, v) if isinstance(v, str) else v for k, v in kw.items()}
  request = SampleRequest(checkpoint=str(tmp_path), output=str(tmp_path / "out"), **kw)  # an empty folder
  with pytest.raises(ValueError, match=message):
    request.validate()


def test_sample_py_names_a_broken_layout_in_one_line(files, tmp_path):
  args = ["--checkpoint", str(tmp_path), "--layout", files["layout_broken.json"], "--output", str(tmp_path / "o")]
  out = subprocess.run([sys.executable, "sample.py", *args], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode != 0 and "Traceback" not in out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: --layout '{files['layout_broken.json']}' is not valid JSON"), out.stderr[-2000:]


def test_the_real_loader_reads_each_task_folder(models):
  """What the module's cached loader stands in for: each folder loads as its kind."""
  pipeline = load_pipeline(models("semantic"))
  assert pipeline.model.concat_kind == "segmentation" and pipeline.model.num_seg_classes == SEG_CLASSES
  assert pipeline.image_size == SIZE
