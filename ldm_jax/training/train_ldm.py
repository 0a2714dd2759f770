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
from typing import Any

import jax
import ml_collections
import numpy as np

from ldm_jax.assembly import (
  FirstStageWeights,
  build_model,
  example_inputs,
  sampler_config,
  schedule_from_config,
  step_config,
)
from ldm_jax.data import make_iterator, to_global_array
from ldm_jax.data.image_io import make_grid, save_png
from ldm_jax.data.latent_records import read_latent_metadata
from ldm_jax.data.tokenizers import load_tokenizer
from ldm_jax.evaluation.feature_nets import FeatureNet
from ldm_jax.models.latent_diffusion import LatentDiffusion
from ldm_jax.nn.lora import LoRAConfig
from ldm_jax.parallel.mesh import batch_sharding, check_batch_size, make_mesh
from ldm_jax.pipeline import LDMPipeline
from ldm_jax.training import latent_cache, ldm_step
from ldm_jax.training.eval_hook import make_eval_hook
from ldm_jax.training.first_stage_copy import copy_differs, save_first_stage_copy
from ldm_jax.training.latent_records_check import check_latent_records
from ldm_jax.training.loop import Hook, LoopConfig, TrainResult, data_counters, train_loop
from ldm_jax.training.lora import lora_config, model_params
from ldm_jax.training.metrics_writer import MetricWriter
from ldm_jax.training.optim import make_optimizer

TOKENIZER_DIR = "tokenizer"


@dataclasses.dataclass
class SampleGridHook:
  """Samples the configured prompts/labels with the EMA weights into a PNG grid."""

  pipeline: LDMPipeline
  config: ml_collections.ConfigDict
  workdir: str
  writer: MetricWriter

  lora: LoRAConfig | None = None

  def __call__(self, step: int, state) -> None:
    trained = state.ema_params if state.ema_params is not None else state.params
    self.pipeline.params = model_params(trained, self.pipeline.frozen, self.lora)
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
    pixels = ("image",) if "image" in batch else ("latent_mean", "latent_logvar")  # data.source=latents: no image
    out = {**{k: batch[k] for k in pixels if k in batch}, **model.host_inputs(batch)}
    return {k: np.asarray(v) for k, v in out.items()}

  return prepare


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


def train(config: ml_collections.ConfigDict, workdir: str, *, first_stage: FirstStageWeights,
          cond_variables: Any = None, unet_params: Any = None,
          feature_net: FeatureNet | None = None) -> TrainResult:
  """Trains (or resumes) the stage-2 model of ``config`` in ``workdir``.

  The weights it starts from are read by the caller (``ldm_jax.apps.train``
  through ``ldm_jax.interop``): the frozen ``first_stage``, the frozen
  conditioning encoder's ``cond_variables`` (None: none, or trained here),
  the UNet's starting ``unet_params`` (None: random; unused when resuming)
  and, with ``config.eval``, the ``feature_net`` of its FID.
  """
  # Mesh.
  mesh = make_mesh(config.mesh)
  check_batch_size(config.train.batch_size, mesh)
  step_cfg = step_config(config)

  # First stage, frozen.
  fs_variables, fs_config, fs_scale = first_stage
  scale_factor = config.first_stage.scale_factor if config.first_stage.scale_factor > 0 else fs_scale
  changed = copy_differs(os.path.join(workdir, "first_stage"), fs_variables, fs_config, scale_factor)
  if changed:
    _forget_old_first_stage(workdir, changed, config.first_stage.checkpoint or "the configured first stage")
  if config.data.source == "latents":  # latents made by another first stage would train on another latent space
    check_latent_records(read_latent_metadata(config.data.path, config.data.train_split), first_stage,
                         config.data.image_size, scale_factor=scale_factor, records=config.data.path,
                         first_stage_name=config.first_stage.checkpoint or "the configured first stage")
  if jax.process_index() == 0:
    save_first_stage_copy(os.path.join(workdir, "first_stage"), fs_variables, fs_config, scale_factor)

  # Tokenizer (stored with the run so sampling needs nothing else).
  tokenizer = load_tokenizer(config.data.tokenizer)
  if tokenizer is not None and jax.process_index() == 0:
    tokenizer.save_pretrained(os.path.join(workdir, TOKENIZER_DIR))

  # Model.
  model = build_model(config, fs_config, scale_factor, tokenizer)
  frozen = {"first_stage": fs_variables}
  if cond_variables is not None:
    frozen["cond"] = cond_variables
  lora = lora_config(config)
  if lora is not None:  # the pretrained UNet stays frozen; only adapters are trained
    if unet_params is None:
      raise ValueError("lora.rank > 0 trains adapters of a pretrained UNet: set pretrained.path or "
                       "pretrained.unet_from")
    frozen["unet"], unet_params = unet_params, None
  schedule = schedule_from_config(config.diffusion)

  # Input.
  writer = MetricWriter(workdir)
  prepare = _host_prepare(model)
  per_process = config.train.batch_size // jax.process_count()
  iterator = make_iterator(config.data, config.data.train_split, global_batch_size=config.train.batch_size,
                           seed=config.seed, tokenizer=tokenizer)
  if config.ldm.cache_latents and config.data.source != "latents":  # precomputed latents need no cache
    latent_cache.check_cacheable(model, config.data)
    one_pass = make_iterator(config.data, config.data.train_split, global_batch_size=config.train.batch_size,
                             seed=config.seed, tokenizer=tokenizer, shuffle=False, num_epochs=1, drop_remainder=False)
    fresh = not os.path.exists(_latent_cache_path(workdir))
    cache = latent_cache.build_latent_cache(
        model, frozen, one_pass, prepare, _latent_cache_path(workdir))
    if fresh:  # what the one pass skipped is logged once, at step 0: training reads the cache from here on
      counts = data_counters(one_pass)
      writer.scalars(0, counts, echo=False)
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
  init_fn = ldm_step.make_init_fn(model, tx, step_cfg, example, frozen, latent_shape, lora)
  step_fn = ldm_step.make_train_step(model, schedule, tx, step_cfg, lora)

  # Hooks.
  hooks = []
  if config.train.sample_every > 0 and (config.sample.prompts or config.sample.labels):
    pipeline = LDMPipeline(model, None, frozen, schedule, tokenizer, config.data.tokenizer.max_length,
                           config.diffusion.prediction_type, config.data.image_size, mesh)
    hooks.append(Hook(config.train.sample_every, SampleGridHook(pipeline, config, workdir, writer, lora), "samples"))
  if config.get("eval") is not None and config.eval.every > 0:
    eval_pipeline = LDMPipeline(model, None, frozen, schedule, tokenizer, config.data.tokenizer.max_length,
                                config.diffusion.prediction_type, config.data.image_size, mesh)
    hooks.append(make_eval_hook(config, eval_pipeline, writer, sampler_config(config), feature_net, lora))

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
      init_args=() if unet_params is None else (unet_params,),
  )
  writer.close()
  return result
