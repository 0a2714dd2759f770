"""evaluate.py on image-conditioned models and first stages, against held-out images (a folder the
test writes): super-resolution (FID, IS, PSNR, SSIM; low-res inputs made by bicubic downsampling),
inpainting (FID, LPIPS on fixed seeded masks) and the autoencoder table (rFID, rIS, PSNR, SSIM,
LPIPS). Feature nets are random (``random_inception``, a random-weight LPIPS file): their numbers
mean nothing, the plumbing and the pairing of each sample with its original are what is checked.
"""

import jax
import numpy as np
import pytest
from PIL import Image
from tiny_conditional_ldms import SIZE, write_pipeline

from ldm_jax.apps.evaluate import EvalRequest, run
from ldm_jax.evaluation import conditional
from ldm_jax.interop.load import load_pipeline
from ldm_jax.interop.lpips import load_lpips_params, save_lpips_params
from ldm_jax.models.first_stage import make_first_stage
from ldm_jax.models.lpips import lpips_template, make_lpips_fn
from ldm_jax.training.first_stage_io import save_first_stage

NUM, BATCH, STEPS = 6, 4, 2  # two batches, the second padded


def psnr64(a, b) -> np.ndarray:
  """PSNR of uint8 images in float64, per image."""
  mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
  return 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval_conditional")
  rng = np.random.default_rng(0)
  held_out = root / "held_out"
  held_out.mkdir()
  for i in range(NUM):
    small = rng.integers(0, 256, (SIZE // 4, SIZE // 4, 3), dtype=np.uint8)
    Image.fromarray(np.repeat(np.repeat(small, 4, axis=0), 4, axis=1)).save(held_out / f"{i:02d}.png")
  lpips = jax.tree.map(lambda s: np.abs(rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)
                       if len(s.shape) > 1 else np.zeros(s.shape, np.float32), lpips_template())
  save_lpips_params(lpips, root / "lpips.npz")
  return root


def _held_out(root) -> np.ndarray:
  return np.stack([np.asarray(Image.open(root / "held_out" / f"{i:02d}.png")) for i in range(NUM)])


def _evaluate(root, name, checkpoint, metrics, **kw) -> dict:
  kw = {"save_images": str(root / name), **kw}
  request = EvalRequest(checkpoint=checkpoint, metrics=metrics, ref_dir=str(root / "held_out"), num_samples=NUM,
                        batch_size=BATCH, steps=STEPS, feature_net="random_inception",
                        lpips_weights=str(root / "lpips.npz"), output=str(root / f"{name}.json"),
                        command=["evaluate.py", "--test"], **kw)
  request.validate()
  return run(request)


def _saved(root, name) -> np.ndarray:
  return np.stack([np.asarray(Image.open(root / name / f"{i:05d}.png")) for i in range(NUM)])


@pytest.fixture(scope="module")
def sr_ckpt(root):
  return write_pipeline(root / "models", "super_resolution")


def test_super_resolution_against_held_out_images(root, sr_ckpt):
  ckpt = sr_ckpt
  report = _evaluate(root, "sr", ckpt, ["fid", "is", "psnr", "ssim"])
  assert report["mode"] == report["task"] == "super_resolution" and report["num_generated"] == NUM
  assert report["reference"]["num_images"] == NUM
  m = report["metrics"]
  assert {"fid", "is_mean", "psnr_mean", "ssim_mean"} <= set(m) and np.isfinite(m["fid"]) and m["is_mean"] >= 1.0
  real, gen = _held_out(root), _saved(root, "sr")
  # Each sample is paired with its own original: the PSNR recomputed from the files.
  assert m["psnr_mean"] == pytest.approx(psnr64(real, gen).mean(), rel=1e-5)
  assert -1.0 <= m["ssim_mean"] <= 1.0
  # The low-res inputs are the held-out images downsampled as in training: sampling them here gives the same images.
  pipeline = load_pipeline(ckpt)
  x = real[:BATCH].astype(np.float32) / 127.5 - 1.0
  again = pipeline.generate({}, low_res=conditional.low_res_inputs(pipeline.model, x), num=BATCH,
                            sampler=pipeline.sampler_config("ddim", STEPS), seed=0)
  np.testing.assert_array_equal(again, gen[:BATCH])


def test_inpainting_on_fixed_seeded_masks(root):
  ckpt = write_pipeline(root / "models", "inpainting")
  report = _evaluate(root, "inpaint", ckpt, ["fid", "lpips"], mask_seed=3)
  assert report["task"] == "inpainting" and "mask_seed 3" in report["sampling"]["inputs"]
  m = report["metrics"]
  assert np.isfinite(m["fid"]) and m["lpips_mean"] > 0
  real, gen = _held_out(root), _saved(root, "inpaint")
  fn = jax.jit(lambda p, a, b: make_lpips_fn(p)(a, b))
  want = np.asarray(fn(load_lpips_params(root / "lpips.npz"), real / 127.5 - 1.0, gen / 127.5 - 1.0))
  assert m["lpips_mean"] == pytest.approx(want.mean(), rel=1e-4)
  # Masks depend on (mask_seed, image index) only: fixed across runs, other seeds other masks.
  a, b = conditional.eval_masks(3, 2, 2, SIZE, SIZE), conditional.eval_masks(3, 0, 4, SIZE, SIZE)[2:]
  np.testing.assert_array_equal(a, b)
  assert 0 < a.mean() < 0.5 and not np.array_equal(a, conditional.eval_masks(4, 2, 2, SIZE, SIZE))


def test_autoencoder_table(root):
  model_config = dict(kind="kl", embed_dim=3, n_embed=0, ddconfig=dict(
      double_z=True, z_channels=3, resolution=SIZE, ch=8, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[],
      attn_type="none", norm_num_groups=4))
  model = make_first_stage(model_config)
  x = jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), np.float32)
  shapes = jax.eval_shape(lambda k, x: model.init(k, x, sample_posterior=False), jax.random.key(0), x)["params"]
  rng = np.random.default_rng(1)
  params = jax.tree_util.tree_map_with_path(
      lambda p, s: (np.ones(s.shape) if p[-1].key == "scale" else rng.normal(0, 0.2, s.shape)).astype(np.float32),
      shapes)
  stage1 = str(root / "stage1")
  save_first_stage(stage1, params, model_config, 1.0)
  report = _evaluate(root, "ae", stage1, ["rfid", "ris", "psnr", "ssim", "lpips"], save_images=None)
  assert report["mode"] == "reconstructions" and report["reference"]["num_images"] == NUM
  m = report["metrics"]
  assert np.isfinite(m["rfid"]) and m["ris_mean"] >= 1.0 and m["lpips_mean"] > 0
  assert np.isfinite(m["psnr_mean"]) and -1.0 <= m["ssim_mean"] <= 1.0


def test_bad_requests_name_the_problem(root, sr_ckpt):
  with pytest.raises(ValueError, match="the lpips metric needs --lpips_weights"):
    EvalRequest(checkpoint=str(root), metrics=["lpips"]).validate()
  with pytest.raises(ValueError, match=r"metrics \['rfid'\] do not apply to samples: .* for super-resolution and "
                     "inpainting models"):
    _evaluate(root, "bad", sr_ckpt, ["rfid"])
