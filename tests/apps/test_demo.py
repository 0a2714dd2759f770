"""The README's first command, end to end at tiny sizes: both stages train,
the held-out prompts are sampled and judged, the report is written, and a
rerun resumes instead of retraining. (The figures of a tiny run are
meaningless; the full-size figures are in docs/demo-results.md.)"""

import dataclasses
import json
import os
import shutil
import types

import jax
import numpy as np
import pytest
from PIL import Image

from ldm_jax.apps.demo import (
  GRID_FILE,
  RESULTS_FILE,
  SIZE_NAMES,
  DemoPreempted,
  DemoSettings,
  demo_configs,
  first_stage_round_trip,
  judged_prompts,
  parse_override,
  run_demo,
)
from ldm_jax.data import captioned_shapes as shapes
from ldm_jax.evaluation import shapes_judge
from ldm_jax.interop.load import load_first_stage

# A constant learning rate keeps stage 2's compiled step independent of
# train.num_steps, so the continuation test reuses it instead of compiling anew.
# Latents cached, as the full demo does (tiny turns caching off).
SETTINGS = DemoSettings(tiny=True, images_per_prompt=1, seen_images_per_pair=1, num_steps=3, judge_steps=5,
                        judge_renders_per_pair=10,
                        ldm_overrides=(("optim.schedule", "constant"), ("ldm.cache_latents", True)))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("demo"))
  return workdir, run_demo(workdir, SETTINGS)


def test_prompts_cover_every_withheld_pair_and_only_seen_pairs_as_controls():
  prompts = judged_prompts(DemoSettings(images_per_prompt=3, seen_images_per_pair=2))
  heldout_pairs = [pair for _, pair in prompts["heldout"]]
  assert sorted(set(heldout_pairs)) == sorted(shapes.WITHHELD_PAIRS)
  assert len(heldout_pairs) == len(shapes.WITHHELD_PAIRS) * len(SIZE_NAMES) * 3
  seen_pairs = {pair for _, pair in prompts["seen"]}
  assert len(seen_pairs) == 36 - len(shapes.WITHHELD_PAIRS)
  assert not seen_pairs & set(shapes.WITHHELD_PAIRS)
  for prompt, (colour, shape) in prompts["heldout"] + prompts["seen"]:
    assert prompt.split()[-2:] == [colour, shape]


def test_stage2_follows_the_first_stage_it_is_given(tmp_path):
  settings = DemoSettings(ae_overrides=(("model.embed_dim", 8), ("model.ddconfig.z_channels", 8)),
                          ldm_overrides=(("data.shapes.max_objects", 2),))
  ae, ldm = demo_configs(str(tmp_path), settings)
  assert (ldm.unet.in_channels, ldm.unet.out_channels, ldm.unet.image_size) == (8, 8, 16)  # 64 px / f=4
  assert ldm.first_stage.checkpoint == os.path.join(str(tmp_path), "autoencoder")
  assert ae.data.shapes.max_objects == 3 and demo_configs(str(tmp_path), DemoSettings())[1].data.shapes.max_objects == 1
  assert ldm.data.shapes.max_objects == 2  # overrides come last
  with pytest.raises(KeyError, match="unknown config key 'train.steps'"):
    demo_configs(str(tmp_path), DemoSettings(ldm_overrides=(("train.steps", 1),)))
  with pytest.raises(KeyError, match="unknown config key 'trian.num_steps'"):
    demo_configs(str(tmp_path), DemoSettings(ldm_overrides=(("trian.num_steps", 1),)))
  with pytest.raises(TypeError, match="'train.num_steps' holds int, not 'many'"):
    demo_configs(str(tmp_path), DemoSettings(ldm_overrides=(parse_override("train.num_steps=many"),)))


def test_command_line_overrides_are_literals_or_bare_strings():
  assert parse_override("train.num_steps=10000") == ("train.num_steps", 10000)
  assert parse_override("optim.learning_rate=2e-3") == ("optim.learning_rate", 2e-3)
  assert parse_override("unet.channel_mult=(1, 2, 4)") == ("unet.channel_mult", (1, 2, 4))
  assert parse_override("optim.schedule=constant") == ("optim.schedule", "constant")
  assert parse_override("sample.prompts=('a red circle',)") == ("sample.prompts", ("a red circle",))
  with pytest.raises(ValueError, match="expected KEY=VALUE"):
    parse_override("train.num_steps")


def test_demo_writes_report_grid_and_checkpoints(demo_run):
  workdir, report = demo_run
  with open(os.path.join(workdir, RESULTS_FILE)) as f:
    on_disk = json.load(f)
  assert on_disk["heldout_prompts"]["num_images"] == 12
  assert on_disk["seen_prompts"]["num_images"] == 30
  for part in ("heldout_prompts", "seen_prompts"):
    for key in ("colour_accuracy", "shape_accuracy", "both_accuracy"):
      assert 0.0 <= on_disk[part][key] <= 1.0
    assert np.isfinite(on_disk[part]["frechet_distance"]) and on_disk[part]["frechet_distance"] > 0
    per_pair = on_disk[part]["per_pair"]
    # The overall accuracy is the image-weighted mean of the per-pair ones.
    n = on_disk[part]["num_images"]
    weights = [len(v["predicted"]) for v in per_pair.values()]
    assert sum(weights) == n
    mean = sum(w * v["colour"] for w, v in zip(weights, per_pair.values())) / n
    assert mean == pytest.approx(on_disk[part]["colour_accuracy"])
  assert on_disk["bar"]["passed"] == (
      on_disk["heldout_prompts"]["colour_accuracy"] >= 0.8 and on_disk["heldout_prompts"]["shape_accuracy"] >= 0.8)
  assert on_disk["autoencoder"]["steps"] == 10 and on_disk["ldm"]["steps"] == 4
  assert np.isfinite(on_disk["autoencoder"]["val_psnr_db"])
  grid = np.asarray(Image.open(os.path.join(workdir, GRID_FILE)))
  assert grid.ndim == 3 and grid.std() > 0  # real samples, not a blank canvas
  for stage in ("autoencoder", "ldm"):
    assert os.listdir(os.path.join(workdir, stage, "checkpoints"))
  assert report["heldout_prompts"] == on_disk["heldout_prompts"]
  # Stage 2 trains on cached latents: what the caching pass read is accounted for once, at step 0.
  with open(os.path.join(workdir, "ldm", "metrics.jsonl")) as f:
    first = json.loads(f.readline())
  assert first == {"step": 0, "data/skipped": 0.0, "data/missing_captions": 0.0}


def test_first_stage_accuracy_is_the_judges_on_decoded_renders(demo_run):
  workdir, report = demo_run
  image_size = demo_configs(workdir, SETTINGS)[0].data.image_size
  ae_dir = os.path.join(workdir, "autoencoder")
  images, colours, kinds = shapes_judge.fresh_renders(image_size, SETTINGS.seed)
  round_trip = first_stage_round_trip(ae_dir, images)
  model, variables, _, _ = load_first_stage(ae_dir)
  decoded = model.apply(variables, model.apply(variables, images, method=model.encode).mean, method=model.decode)
  expected = np.clip(np.asarray(decoded, np.float64), -1.0, 1.0)
  np.testing.assert_allclose(round_trip, expected, atol=0.5 / 127.5 + 1e-5)  # uint8 rounding only
  judge = shapes_judge.train_judge(image_size, steps=SETTINGS.judge_steps, per_pair=SETTINGS.judge_renders_per_pair,
                                   seed=SETTINGS.seed)  # deterministic
  assert (report["judge"]["first_stage_colour_accuracy"], report["judge"]["first_stage_shape_accuracy"]) == \
      judge.accuracy(round_trip, colours, kinds)


def test_rerun_resumes_without_training_again(demo_run):
  workdir, first = demo_run
  second = run_demo(workdir, SETTINGS)
  assert second["autoencoder"]["steps"] == first["autoencoder"]["steps"]
  assert second["ldm"]["steps"] == first["ldm"]["steps"]
  assert second["autoencoder"]["val_psnr_db"] == pytest.approx(first["autoencoder"]["val_psnr_db"], abs=1e-4)
  # Same weights, same seeds, deterministic sampler: the same judgement.
  assert second["heldout_prompts"]["per_pair"] == first["heldout_prompts"]["per_pair"]


def test_a_preempted_stage_stops_the_demo_before_sampling(tmp_path, monkeypatch):
  # SIGTERM during a stage makes its train() return preempted (tests/test_training_loop.py);
  # the demo must then stop rather than sample and judge a half-trained model.
  from ldm_jax.apps import train as train_app

  monkeypatch.setattr(train_app, "train_first_stage", lambda config, workdir: types.SimpleNamespace(
      preempted=False, step=10))
  monkeypatch.setattr(train_app, "train_latent_diffusion",
                      lambda config, workdir: types.SimpleNamespace(preempted=True, step=7))
  with pytest.raises(DemoPreempted, match=r"stage 2 was stopped \(SIGTERM\) at step 7.*run the same command"):
    run_demo(str(tmp_path), SETTINGS)
  assert not os.path.exists(tmp_path / RESULTS_FILE) and not os.path.exists(tmp_path / GRID_FILE)


def test_a_rerun_with_more_stage2_steps_continues_it(demo_run, tmp_path):
  workdir, first = demo_run
  longer = str(tmp_path / "longer")
  shutil.copytree(workdir, longer)
  steps = first["ldm"]["steps"] + 2
  more_steps = SETTINGS.ldm_overrides + (("train.num_steps", steps),)
  report = run_demo(longer, dataclasses.replace(SETTINGS, ldm_overrides=more_steps))
  assert report["ldm"]["steps"] == steps
  assert report["autoencoder"]["steps"] == first["autoencoder"]["steps"]  # stage 1 not retrained
  with open(os.path.join(longer, "ldm", "metrics.jsonl")) as f:
    logged = [json.loads(line)["step"] for line in f]
  # Continued: a restart from step 0 would log its early steps a second time.
  assert max(logged) == steps and logged == sorted(set(logged)), logged


def test_stage2_refuses_to_resume_on_another_first_stage(demo_run, tmp_path):
  from ldm_jax.apps.train import train_latent_diffusion
  from ldm_jax.training.first_stage_copy import load_first_stage_copy, save_first_stage_copy

  workdir, _ = demo_run
  moved = str(tmp_path / "run")
  shutil.copytree(workdir, moved)
  ldm_config = demo_configs(moved, SETTINGS)[1]
  ldm_config.ldm.cache_latents = False  # a stale cache must go, not be rebuilt in its place
  # Stand-in for an autoencoder trained further after stage 2 started: the run's copy no longer matches.
  copy_dir = os.path.join(moved, "ldm", "first_stage")
  _, variables, scale, fs_config = load_first_stage_copy(copy_dir)
  nudged = jax.tree.map(lambda a: np.asarray(a) + 1e-3, variables)
  save_first_stage_copy(copy_dir, nudged, fs_config, scale)
  message = "trained on another first stage: the one it saved and .* differ in their weights"
  with pytest.raises(ValueError, match=message):
    train_latent_diffusion(ldm_config, os.path.join(moved, "ldm"))
  # Without checkpoints there is nothing to protect: stage 2 starts over, and drops latents cached from the old one.
  save_first_stage_copy(copy_dir, nudged, fs_config, scale * 2)
  shutil.rmtree(os.path.join(moved, "ldm", "checkpoints"))
  stale_cache = os.path.join(moved, "ldm", "latent_cache", "process_0.npz")
  os.makedirs(os.path.dirname(stale_cache), exist_ok=True)  # the demo run cached its latents there
  np.savez(stale_cache, latent_mean=np.ones((2, 4, 4, 3), np.float32))
  result = train_latent_diffusion(ldm_config, os.path.join(moved, "ldm"))
  assert result.step == ldm_config.train.num_steps and not os.path.exists(stale_cache)
