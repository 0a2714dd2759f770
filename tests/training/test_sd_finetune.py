"""Fine-tuning Stable Diffusion from its published weights (configs/sd_finetune.py), end to end on the tiny
random-weight SD folder a test writes with diffusers and tar shards it writes as img2dataset does: the run starts
from exactly the published weights and schedule, its loss falls, it resumes exactly, it exports to a folder
diffusers loads with the trained weights; LoRA trains adapters only, and a LoRA run samples as the frozen UNet plus
the adapters' update."""

import io
import json
import os
import shutil
import tarfile

import jax
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image
from sd_reference import SD_V1_LIKE, diffusers, make_sd_folder, numpy_state

from ldm_jax.apps import train as apps_train
from ldm_jax.apps.train import train_latent_diffusion
from ldm_jax.assembly import schedule_from_config
from ldm_jax.config import ConfigError, load_config
from ldm_jax.interop.export import export_diffusers
from ldm_jax.interop.export import main as export_main
from ldm_jax.interop.finetune import start_from_pretrained
from ldm_jax.interop.load import load_pipeline
from ldm_jax.interop.lora_files import apply_lora_file
from ldm_jax.interop.naming import StateDictMismatchError
from ldm_jax.interop.pretrained import load_pretrained_pipeline
from ldm_jax.training.checkpoint import Checkpointer
from ldm_jax.training.lora import lora_config

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "sd_finetune.py")


def _write_shards(folder, rng) -> None:
  """Two img2dataset-style tar shards of 8 captioned 40x48 images (smooth colour fields, JPEG)."""
  folder.mkdir()
  colours = rng.uniform(0, 255, (8, 2, 3))
  ramp = np.linspace(0, 1, 48)[None, :, None]
  for shard in range(2):
    with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
      for i in range(4 * shard, 4 * shard + 4):
        pixels = (colours[i, 0] * (1 - ramp) + colours[i, 1] * ramp) * np.ones((40, 1, 1))
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=95)
        for ext, data in (("jpg", buffer.getvalue()), ("txt", f"a colour field {i}".encode())):
          info = tarfile.TarInfo(f"{i:09d}.{ext}")
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
  root = tmp_path_factory.mktemp("sd_finetune")
  ref = make_sd_folder(root, SD_V1_LIKE, seed=21)
  _write_shards(root / "shards", np.random.default_rng(0))
  return root, ref


def _config(sd, *switches, **train):
  root, _ = sd
  config = load_config(f"{CONFIG}:" + ",".join(("sd15", "tiny") + switches))
  config.pretrained.path = str(root / "sd")
  config.data.update(source="webdataset", path=str(root / "shards" / "{00000..00001}.tar"), num_threads=0)
  config.compilation_cache_dir = str(root / "xla")  # the resumed run reuses the first run's compiled step
  config.train.update(**train)
  return config


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree))


def _assert_trees_equal(a, b):
  a, b = _flat(a), _flat(b)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg="/".join(k))


def test_start_takes_weights_and_schedule_from_the_published_model(sd):
  root, ref = sd
  start = start_from_pretrained(_config(sd))
  published = load_pretrained_pipeline(str(root / "sd"))
  _assert_trees_equal(start.unet_params, published.params["unet"])
  _assert_trees_equal(start.first_stage.variables, published.frozen["first_stage"])
  _assert_trees_equal(start.cond_variables, published.frozen["cond"])
  c = start.config
  assert start.first_stage.scale_factor == pytest.approx(ref.vae.config.scaling_factor)
  assert (c.diffusion.linear_start, c.diffusion.linear_end) == (ref.scheduler.config.beta_start,
                                                                ref.scheduler.config.beta_end)
  # diffusers' "scaled_linear" is the reference's "linear" (linear in sqrt(beta)): the same betas.
  np.testing.assert_array_equal(schedule_from_config(c.diffusion).betas, published.schedule.betas)
  assert c.diffusion.prediction_type == "eps"
  assert c.sample.steps_offset == 1 and c.data.tokenizer.path.endswith("tokenizer")
  assert c.unet.model_channels == 32 and c.unet.context_dim == 768


def test_full_finetune_trains_resumes_exactly_and_exports_to_diffusers(sd, tmp_path, monkeypatch):
  root, ref = sd
  run = tmp_path / "run"
  unet_read = []  # with_unet of each start_from_pretrained call
  start = apps_train.start_from_pretrained
  monkeypatch.setattr(apps_train, "start_from_pretrained",
                      lambda config, **kw: unet_read.append(kw["with_unet"]) or start(config, **kw))
  result = train_latent_diffusion(_config(sd, num_steps=4, checkpoint_every=2, log_every=1), str(run))
  assert result.step == 4 and np.isfinite(result.last_metrics["loss"])

  # Resume from step 2: the same state at step 4 as the uninterrupted run (nothing re-initialised), without
  # converting the published UNet again (the checkpoint holds it).
  resumed = tmp_path / "resumed"
  shutil.copytree(run, resumed)
  shutil.rmtree(resumed / "checkpoints" / "4")
  train_latent_diffusion(_config(sd, num_steps=4, checkpoint_every=2, log_every=1), str(resumed))
  assert unet_read == [True, False]
  _assert_trees_equal(load_pipeline(str(run), use_ema=False).params, load_pipeline(str(resumed), use_ema=False).params)
  a, b = load_pipeline(str(run)), load_pipeline(str(resumed))
  _assert_trees_equal(a.params, b.params)

  # Longer, on the same 8 images (the same compiled step, from the cache): the loss falls. Each step draws other
  # timesteps and noise, so compare the means of the first and last five steps.
  longer = tmp_path / "longer"
  train_latent_diffusion(_config(sd, num_steps=20, checkpoint_every=20, log_every=1), str(longer))
  losses = [json.loads(line)["loss"] for line in (longer / "metrics.jsonl").read_text().splitlines()]
  assert len(losses) == 20 and np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5]), losses

  # Trained: the UNet moved away from the published one; the frozen parts did not.
  published = load_pretrained_pipeline(str(root / "sd"))
  moved = [k for k, v in _flat(a.params["unet"]).items() if not np.array_equal(v, _flat(published.params["unet"])[k])]
  assert moved
  _assert_trees_equal(a.frozen["first_stage"], published.frozen["first_stage"])

  # An original single file: the reference's keys, read back to exactly the run's weights.
  single = tmp_path / "finetuned.safetensors"
  export_main([str(run), str(single), "--single_file"])
  reread = load_pretrained_pipeline(str(single), tokenizer=str(root / "sd" / "tokenizer"))
  _assert_trees_equal(reread.params["unet"], a.params["unet"])
  _assert_trees_equal(reread.frozen, {k: a.frozen[k] for k in ("first_stage", "cond")})

  out = tmp_path / "exported"
  export_diffusers(a, str(out))
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None, feature_extractor=None)
  again = load_pretrained_pipeline(str(out))
  _assert_trees_equal(again.params["unet"], a.params["unet"])
  # diffusers holds exactly our weights: its UNet equals the reference UNet where we did not train...
  theirs, original = numpy_state(pipe.unet), numpy_state(ref.unet)
  assert theirs.keys() == original.keys()
  np.testing.assert_array_equal(numpy_state(pipe.vae)["decoder.conv_out.weight"],
                                numpy_state(ref.vae)["decoder.conv_out.weight"])
  # ...and differs where we did.
  assert any(not np.array_equal(theirs[k], original[k]) for k in theirs)


def test_lora_trains_adapters_only_and_samples_merged(sd, tmp_path):
  root, _ = sd
  config = _config(sd, "lora", num_steps=2, checkpoint_every=2)
  run = tmp_path / "lora"
  train_latent_diffusion(config, str(run))
  ckpt = Checkpointer(str(run / "checkpoints"), async_save=False)
  meta = ckpt.read_meta(2)
  ckpt.close()
  assert meta["config"]["lora"]["rank"] == 4

  loaded = load_pipeline(str(run), use_ema=False)
  published = load_pretrained_pipeline(str(root / "sd"))
  base, tuned = _flat(published.params["unet"]), _flat(loaded.params["unet"])
  changed = {"/".join(k) for k in base if not np.array_equal(base[k], tuned[k])}
  # Only attention projections (the adapters' targets) differ from the published UNet.
  assert changed and all(k.split("/")[-2] in ("to_q", "to_k", "to_v", "to_out_0") for k in changed)

  # Exported as a LoRA file, applied to the published model: the run's merged UNet again.
  export_main([str(run), str(tmp_path / "lora.safetensors"), "--lora", "--no-ema"])
  applied = apply_lora_file(published, str(tmp_path / "lora.safetensors"))
  a, b = _flat(applied.params["unet"]), tuned
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6, err_msg="/".join(k))
  assert lora_config(load_config(f"{CONFIG}:sd15,tiny")) is None


def test_inpainting_variant_grows_the_input_convolution_with_zeros(sd):
  root, _ = sd
  config = load_config(f"{CONFIG}:sd2_inpaint,tiny")
  config.pretrained.path = str(root / "sd")
  start = start_from_pretrained(config)
  assert start.config.concat.kind == "inpaint" and start.config.unet.in_channels == 9
  published = load_pretrained_pipeline(str(root / "sd")).params["unet"]["params"]["input_blocks_0_0"]["kernel"]
  grown = start.unet_params["params"]["input_blocks_0_0"]["kernel"]
  assert grown.shape == published.shape[:2] + (9,) + published.shape[3:]
  np.testing.assert_array_equal(grown[:, :, :4], published)
  np.testing.assert_array_equal(grown[:, :, 4:], 0.0)
  config.pretrained.extra_in_channels = "error"
  with pytest.raises(StateDictMismatchError, match="input_blocks_0_0/kernel"):
    start_from_pretrained(config)


def test_bad_starts_are_named(sd, tmp_path):
  config = _config(sd, num_steps=1)
  config.pretrained.path = str(tmp_path / "missing-model")
  with pytest.raises(ConfigError, match="pretrained.path"):
    train_latent_diffusion(config, str(tmp_path / "a"))
  config = _config(sd, "lora", num_steps=1)
  config.pretrained.weights = "best"
  with pytest.raises(ConfigError, match="pretrained.weights"):
    train_latent_diffusion(config, str(tmp_path / "b"))
