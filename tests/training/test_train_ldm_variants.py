"""The non-text shapes LDMs (class, layout, semantic, super-resolution,
inpainting) at tiny sizes: ``train_latent_diffusion`` runs and checkpoints, and
``load_pipeline`` on the run directory samples with that variant's
conditioning.

Each sampling call holds three rows that start from the same latent noise:
rows 0 and 2 share a condition, row 1 has another. So row 1 differs from
row 0 only because the model uses its conditioning, and the row 0 / row 2
difference measures the numerical noise that difference must stand above.
(After two training steps the UNet's zero-initialised output conv is barely
off zero, so the differences are small in absolute terms.)

Resume at the ``train_ldm`` level (kill, restore, identical parameters) is
covered by ``test_multiprocess.py``, which restores a step-2 checkpoint of
this same tiny class-conditional model and continues to step 4.
"""

import json
import os

import numpy as np
import pytest

from ldm_jax.assembly import sampler_config
from ldm_jax.config import load_config
from ldm_jax.data.image_io import to_uint8
from ldm_jax.interop.load import load_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZE, LATENT, CHANNELS = 32, 8, 3  # tiny config: 32x32 images, KL-f4 first stage with 3 latent channels
VARIANTS = ("shapes_class", "shapes_layout", "shapes_semantic", "shapes_sr", "shapes_inpaint")
# Sampling compiles one more program per variant (~20 s of CPU each): the
# cheapest three are sampled, layout and inpainting only trained. (Inpainting
# sampling through the same pipeline code is exercised by test_sample_cli.py
# on a latent-blending model; the 9-channel path is not sampled here.)
SAMPLED = ("shapes_class", "shapes_semantic", "shapes_sr")
STEPS = 2


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("shapes_data"))


@pytest.fixture(scope="module", params=VARIANTS)
def trained(request, data_dir, tmp_path_factory):
  from ldm_jax.apps.train import train_latent_diffusion as train

  variant = request.param
  config = load_config(f"{ROOT}/configs/ldm.py:{variant},tiny")
  config.data.data_dir = data_dir
  config.data.shapes.update(num_train=16, num_validation=8, num_test=8)
  config.train.update(num_steps=STEPS, checkpoint_every=STEPS, log_every=1)
  workdir = str(tmp_path_factory.mktemp(variant))
  result = train(config, workdir)
  return variant, workdir, result


def test_trains_and_checkpoints(trained):
  variant, workdir, result = trained
  assert result.step == STEPS and not result.preempted
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}
  assert sorted(losses) == list(range(1, STEPS + 1)), losses
  assert all(np.isfinite(v) and v > 0 for v in losses.values()), losses
  assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(STEPS)]
  assert os.path.isfile(os.path.join(workdir, "first_stage", "weights.safetensors"))


def _conditions(variant: str, model, rng: np.random.Generator) -> dict:
  """``generate`` keyword arguments for rows [A, B, A] of this variant's conditioning."""
  pick = lambda a, b: np.stack([a, b, a])  # noqa: E731
  if variant == "shapes_class":
    return dict(inputs={"label": np.asarray([3, 20, 3], np.int32)})
  if variant == "shapes_layout":
    # (x0, y0, w, h) boxes; A: one object, B: two others elsewhere (max_objects=3).
    boxes = pick(np.asarray([[0.1, 0.1, 0.5, 0.5], [0, 0, 0, 0], [0, 0, 0, 0]], np.float32),
                 np.asarray([[0.5, 0.4, 0.4, 0.5], [0.0, 0.6, 0.3, 0.3], [0, 0, 0, 0]], np.float32))
    labels = pick(np.asarray([5, -1, -1]), np.asarray([20, 9, -1])).astype(np.int32)
    tokens = model.cond_stage.module.tokenize(boxes, labels, np.asarray([1, 2, 1]))
    assert not np.array_equal(tokens[0], tokens[1]) and np.array_equal(tokens[0], tokens[2])
    return dict(inputs={"layout_tokens": tokens})
  if variant == "shapes_semantic":
    blocks = rng.integers(0, model.num_seg_classes, (2, SIZE // 8, SIZE // 8))
    seg = np.repeat(np.repeat(blocks, 8, axis=1), 8, axis=2)  # random 8x8-pixel segments
    onehot = np.eye(model.num_seg_classes, dtype=np.float32)[pick(seg[0], seg[1])]
    return dict(inputs={"segmentation_onehot": onehot})
  if variant == "shapes_sr":
    low = rng.uniform(-1, 1, (2, model.low_res_size, model.low_res_size, 3)).astype(np.float32)
    return dict(inputs={}, low_res=pick(low[0], low[1]))
  if variant == "shapes_inpaint":
    images = rng.uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    masks = np.zeros((2, SIZE, SIZE), np.float32)
    masks[0, 4:20, 8:28] = 1.0  # 1 = repaint
    masks[1, 16:, :12] = 1.0
    return dict(inputs={}, init_images=pick(images[0], images[1]), mask=pick(masks[0], masks[1]))
  raise AssertionError(variant)


@pytest.mark.parametrize("trained", SAMPLED, indirect=True)
def test_samples_follow_the_conditioning(trained):
  variant, workdir, _ = trained
  pipeline = load_pipeline(workdir)
  model = pipeline.model
  assert pipeline.image_size == SIZE and model.latent_channels == CHANNELS
  rng = np.random.default_rng(sum(map(ord, variant)))
  kw = _conditions(variant, model, rng)
  inputs = kw.pop("inputs")
  x_T = np.repeat(rng.standard_normal((1, LATENT, LATENT, CHANNELS)).astype(np.float32), 3, axis=0)
  common = dict(num=3, sampler=pipeline.sampler_config("ddim", 2), guidance_scale=2.0, x_T=x_T, **kw)
  images = pipeline.generate(inputs, output_type="float", **common)
  assert images.shape == (3, SIZE, SIZE, 3) and images.dtype == np.float32
  assert np.all(np.isfinite(images)) and images.min() >= 0.0 and images.max() <= 1.0
  noise = np.abs(images[0] - images[2]).max()
  effect = np.abs(images[0] - images[1]).max()
  # Measured: class 7e-6 (through the middle block's cross-attention and the
  # barely trained output conv), semantic 5e-3, super-resolution 1e-2; rows
  # with equal inputs agree exactly.
  assert effect > 1e-6 and effect > 100 * noise, (effect, noise)
  # The default uint8 output is the same samples, rounded (the program is reused).
  as_uint8 = pipeline.generate(inputs, **common)
  assert as_uint8.dtype == np.uint8 and as_uint8.shape == (3, SIZE, SIZE, 3)
  np.testing.assert_array_equal(as_uint8, to_uint8(images * 2.0 - 1.0))


def test_sample_guidance_interval_reaches_the_grid_and_eval_sampler():
  config = load_config(f"{ROOT}/configs/ldm.py:shapes_txt2img,tiny")
  assert sampler_config(config).guidance_interval is None  # the default () guides every step
  config.sample.guidance_interval = (100, 1000)
  assert sampler_config(config).guidance_interval == (100.0, 1000.0)
  del config.sample["guidance_interval"]  # a run's config saved before the key existed
  assert sampler_config(config).guidance_interval is None
