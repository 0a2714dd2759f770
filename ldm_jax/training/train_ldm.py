"""Stage 2: train a latent diffusion model on a frozen first stage.

Sections: mesh → first stage (+ scale factor) → tokenizer → model and its
consistency checks → input (optionally cached latents) → state and step →
hooks (sample grids) → the shared loop. Everything needed to sample later is
in the run directory: checkpoints (UNet, EMA, trainable encoders), the
tokenizer, a copy of the first stage's weights, and the config with the scale
factor in every checkpoint's metadata.
"""

import dataclasses
import json
import logging
import os

import jax
import ml_collections
import numpy as np

from ldm_jax.data import make_iterator, to_global_array
from ldm_jax.data.tokenizers import load_tokenizer, tokenize
from ldm_jax.diffusion.config import SamplerConfig
from ldm_jax.diffusion.losses import check_timestep_sampling
from ldm_jax.diffusion.schedules import make_schedule
from ldm_jax.image_grid import make_grid, save_png
from ldm_jax.models.build import build_latent_diffusion
from ldm_jax.models.latent_diffusion import LatentDiffusion
from ldm_jax.pipeline import LDMPipeline
from ldm_jax.training import latent_cache, ldm_step
from ldm_jax.training.eval_hook import make_eval_hook
from ldm_jax.models.first_stage import make_first_stage
from ldm_jax.training.first_stage_copy import copy_differs, save_first_stage_copy
from ldm_jax.training.first_stage_io import load_first_stage
from ldm_jax.training.loop import Hook, LoopConfig, TrainResult, train_loop
from ldm_jax.training.mesh import batch_sharding, check_batch_size, make_mesh
from ldm_jax.training.metrics_writer import MetricWriter
from ldm_jax.training.optim import make_optimizer

TOKENIZER_DIR = "tokenizer"


def schedule_from_config(diffusion: ml_collections.ConfigDict):
  return make_schedule(diffusion.schedule, diffusion.timesteps, diffusion.linear_start, diffusion.linear_end)


def _text_cond_overrides(config, tokenizer) -> dict:
  """The empty caption as *this* tokenizer encodes it (the CFG null input)."""
  if config.cond_stage.kind not in ("text", "clip") or tokenizer is None:
    return {}
  ids, mask = tokenize(tokenizer, [""], config.data.tokenizer.max_length)
  n = int(mask[0].sum())
  return {"empty_token_ids": tuple(int(i) for i in ids[0, :n]), "pad_token_id": int(ids[0, -1]) if n < ids.shape[1] else 0}


def build_model(config: ml_collections.ConfigDict, first_stage_config: dict, scale_factor: float, tokenizer=None) -> LatentDiffusion:
  """The stage-2 model of a config, with the null caption of its tokenizer."""
  cond = dict(config.cond_stage.to_dict())
  cond.update(_text_cond_overrides(config, tokenizer))
  model = build_latent_diffusion(
      unet=config.unet, first_stage=first_stage_config, cond_stage=cond, concat=config.concat, ldm=config.ldm,
      scale_factor=scale_factor, compute_dtype=config.precision.compute_dtype, attention_impl=config.attention_impl,
  )
  model.check_consistency(config.data.image_size)
  vocab = getattr(model.cond_stage.module, "vocab_size", None)
  if tokenizer is not None and vocab is not None and len(tokenizer) > vocab:
    raise ValueError(
        f"the tokenizer has {len(tokenizer)} tokens but cond_stage.vocab_size is {vocab}: "
        f"set config.cond_stage.vocab_size >= {len(tokenizer)}"
    )
  return model


def step_config(config: ml_collections.ConfigDict) -> ldm_step.LDMStepConfig:
  d = config.diffusion
  check_timestep_sampling(d.get("timestep_sampling", "uniform"), d.get("timestep_scale", 1.0))
  return ldm_step.LDMStepConfig(
      prediction_type=d.prediction_type, loss_type=d.loss_type, weighting=d.weighting, cond_dropout=d.cond_dropout,
      drop_concat=d.drop_concat, ema_decay=config.ema.decay, grad_accum_steps=config.train.grad_accum_steps,
      # Runs saved before these keys existed sampled uniformly.
      timestep_sampling=d.get("timestep_sampling", "uniform"), timestep_loc=d.get("timestep_loc", 0.0),
      timestep_scale=d.get("timestep_scale", 1.0),
  )


def sampler_config(config: ml_collections.ConfigDict) -> SamplerConfig:
  s = config.sample
  return SamplerConfig(
      sampler=s.sampler, num_steps=s.num_steps, timestep_spacing=s.timestep_spacing, steps_offset=s.steps_offset,
      prediction_type=config.diffusion.prediction_type,
      guidance_interval=tuple(s.get("guidance_interval", ())) or None,  # runs saved before it existed: every step
  )


@dataclasses.dataclass
class SampleGridHook:
  """Samples the configured prompts/labels with the EMA weights into a PNG grid."""

  pipeline: LDMPipeline
  config: ml_collections.ConfigDict
  workdir: str
  writer: MetricWriter

  def __call__(self, step: int, state) -> None:
    self.pipeline.params = state.ema_params if state.ema_params is not None else state.params
    s = self.config.sample
    kw = dict(sampler=sampler_config(self.config), guidance_scale=s.guidance_scale, seed=s.seed)
    if s.prompts:
      images, labels = self.pipeline.text_to_image(list(s.prompts), **kw), list(s.prompts)
    elif s.labels:
      images, labels = self.pipeline.class_to_image(list(s.labels), **kw), [int(x) for x in s.labels]
    else:
      images, labels = self.pipeline.generate({}, num=s.num_unconditional, **kw), []
    if jax.process_index() == 0:
      grid = make_grid(images)
      save_png(os.path.join(self.workdir, "samples", f"step_{step:06d}.png"), grid, {"step": step, "prompts": labels})
      self.writer.image(step, "samples", grid)


def _host_prepare(model: LatentDiffusion):
  def prepare(batch: dict) -> dict:
    out = {"image": batch["image"], **model.host_inputs(batch)}
    return {k: np.asarray(v) for k, v in out.items()}

  return prepare


def example_inputs(model: LatentDiffusion, config: ml_collections.ConfigDict) -> dict:
  """Zero-valued conditioning inputs of one example, as the step sees them
  (only their shapes matter: they size the initialised networks)."""
  example = {}
  if model.cond_key == "tokens":
    example["tokens"] = np.zeros((1, config.data.tokenizer.max_length), np.int32)
  elif model.cond_key == "label":
    example["label"] = np.zeros((1,), np.int32)
  elif model.cond_key == "layout_tokens":
    example["layout_tokens"] = model.cond_stage.unconditional(np.zeros((1, 1), np.int32))
  if model.use_label_emb:
    example["label"] = np.zeros((1,), np.int32)
  size = config.data.image_size
  if model.concat_kind == "segmentation":
    example["segmentation"] = np.zeros((1, size, size), np.int32)
  return model.derive_inputs(example, np.zeros((1, size, size, 3), np.float32))


def resolve_first_stage(section: ml_collections.ConfigDict, image_size: int):
  """``(variables, model_config, scale_factor)`` of the configured first stage.

  ``checkpoint`` names a stage-1 run directory (or, through the interop
  package, a published file). ``random_init=True`` with a ``model`` section
  gives an untrained one: only for tests and benchmarks.
  """
  if section.checkpoint:
    _, variables, scale, model_config = load_first_stage(section.checkpoint)
    return variables, model_config, scale
  if section.get("random_init", False):
    model_config = section.model.to_dict()
    model = make_first_stage(model_config)
    x = np.zeros((1, image_size, image_size, 3), np.float32)
    # Initialise through encode and decode so both halves get parameters.
    variables = jax.jit(lambda k: model.init(k, x, method=_encode_decode))(jax.random.key(0))
    return variables, model_config, 1.0
  raise ValueError(
      "config.first_stage.checkpoint is empty: train a first stage first "
      "(python train.py --config configs/autoencoder.py:... --workdir RUN) and set "
      "--config.first_stage.checkpoint=RUN"
  )


def _encode_decode(module, x):
  z = module.encode(x)
  return module.decode(z.mean if hasattr(z, "mean") else z)


def _latent_cache_path(workdir: str) -> str:
  return os.path.join(workdir, "latent_cache", f"process_{jax.process_index()}.npz")


def _forget_old_first_stage(workdir: str, what: str, source: str) -> None:
  """The run's first stage changed: refuse if stage 2 has trained on the old one, else drop its latents."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if os.path.isdir(ckpt_dir) and any(name.isdigit() for name in os.listdir(ckpt_dir)):
    raise ValueError(
        f"{workdir} holds stage-2 checkpoints trained on another first stage: the one it saved and {source} "
        f"differ in their {what}. Resuming would mix two latent spaces; train stage 2 in a new workdir, or "
        "point first_stage.checkpoint at the first stage it was trained on.")
  logging.info("first stage changed (%s): rebuilding the latent cache", what)
  if os.path.exists(_latent_cache_path(workdir)):
    os.remove(_latent_cache_path(workdir))


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
  """Trains (or resumes) the stage-2 model of ``config`` in ``workdir``."""
  # Mesh.
  mesh = make_mesh(config.mesh)
  check_batch_size(config.train.batch_size, mesh)
  step_cfg = step_config(config)  # a bad diffusion setting fails here, before anything loads

  # First stage, frozen.
  fs_variables, fs_config, fs_scale = resolve_first_stage(config.first_stage, config.data.image_size)
  scale_factor = config.first_stage.scale_factor if config.first_stage.scale_factor > 0 else fs_scale
  changed = copy_differs(os.path.join(workdir, "first_stage"), fs_variables, fs_config, scale_factor)
  if changed:
    _forget_old_first_stage(workdir, changed, config.first_stage.checkpoint or "the configured first stage")
  if jax.process_index() == 0:
    save_first_stage_copy(os.path.join(workdir, "first_stage"), fs_variables, fs_config, scale_factor)

  # Tokenizer (stored with the run so sampling needs nothing else).
  tokenizer = load_tokenizer(config.data.tokenizer)
  if tokenizer is not None and jax.process_index() == 0:
    tokenizer.save_pretrained(os.path.join(workdir, TOKENIZER_DIR))

  # Model.
  model = build_model(config, fs_config, scale_factor, tokenizer)
  frozen = {"first_stage": fs_variables}
  if model.cond_key is not None and not model.cond_stage.trainable:
    frozen["cond"] = model.cond_stage.init(jax.random.key(0), np.zeros((1, config.data.tokenizer.max_length), np.int32))
  schedule = schedule_from_config(config.diffusion)

  # Input.
  prepare = _host_prepare(model)
  per_process = config.train.batch_size // jax.process_count()
  iterator = make_iterator(config.data, config.data.train_split, global_batch_size=config.train.batch_size,
                           seed=config.seed, tokenizer=tokenizer)
  if config.ldm.cache_latents:
    latent_cache.check_cacheable(model, config.data)
    one_pass = make_iterator(config.data, config.data.train_split, global_batch_size=config.train.batch_size,
                             seed=config.seed, tokenizer=tokenizer, shuffle=False, num_epochs=1, drop_remainder=False)
    cache = latent_cache.build_latent_cache(
        model, frozen, one_pass, prepare, _latent_cache_path(workdir))
    iterator = latent_cache.cached_iterator(cache, per_process, config.seed)
    prepare = lambda b: b  # noqa: E731  (the cache already holds prepared fields)
  sharding = batch_sharding(mesh)

  def global_batches():
    for host_batch in iterator:
      yield to_global_array(prepare(host_batch), sharding)

  batches = global_batches()
  example = example_inputs(model, config)
  latent_side = config.data.image_size // model.downsample_factor
  latent_shape = (1, latent_side, latent_side, model.latent_channels)

  # State and step.
  tx, _ = make_optimizer(config.optim, config.train.num_steps, config.train.batch_size)
  init_fn = ldm_step.make_init_fn(model, tx, step_cfg, example, frozen, latent_shape)
  step_fn = ldm_step.make_train_step(model, schedule, tx, step_cfg)

  # Hooks.
  writer = MetricWriter(workdir)
  hooks = []
  if config.train.sample_every > 0 and (config.sample.prompts or config.sample.labels):
    pipeline = LDMPipeline(model, None, frozen, schedule, tokenizer, config.data.tokenizer.max_length,
                           config.diffusion.prediction_type, config.data.image_size, mesh)
    hooks.append(Hook(config.train.sample_every, SampleGridHook(pipeline, config, workdir, writer), "samples"))
  if config.get("eval") is not None and config.eval.every > 0:
    eval_pipeline = LDMPipeline(model, None, frozen, schedule, tokenizer, config.data.tokenizer.max_length,
                                config.diffusion.prediction_type, config.data.image_size, mesh)
    hooks.append(make_eval_hook(config, eval_pipeline, writer, sampler_config(config)))

  meta = {
      "config": json.loads(json.dumps(config.to_dict(), default=str)),
      "first_stage": fs_config,
      "scale_factor": scale_factor,
      "tokenizer": TOKENIZER_DIR if tokenizer is not None else None,
  }
  loop_cfg = LoopConfig(
      num_steps=config.train.num_steps, log_every=config.train.log_every,
      checkpoint_every=config.train.checkpoint_every, keep_checkpoints=config.train.keep_checkpoints,
      global_batch_size=config.train.batch_size, loss_keys=("loss",), fsdp_min_size=config.mesh.fsdp_min_size,
      partition_rules=tuple(config.mesh.rules), progress_bar=config.train.progress_bar,
  )
  logging.info("training %s for %d steps in %s", type(model.unet).__name__, config.train.num_steps, workdir)
  rng = jax.random.key(config.seed, impl=config.get("prng_impl") or None)
  result = train_loop(
      workdir=workdir, mesh=mesh, cfg=loop_cfg, init_fn=init_fn, step_fn=step_fn, batches=batches,
      data_iterator=iterator, rng=rng, hooks=hooks, meta=meta, writer=writer, frozen=frozen,
  )
  writer.close()
  return result
