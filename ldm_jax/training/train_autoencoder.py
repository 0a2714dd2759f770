"""Stage 1 trainer: ``train(config, workdir)`` for KL and VQ autoencoders.

Sections: mesh; loss and model; input (training stream, fixed validation
and scale-factor images); state and step; evaluation hook (PSNR/LPIPS,
reconstruction grids); checkpoint metadata (model config and the latent
scale factor of the saved weights); loop; summary.
"""

import copy
import dataclasses
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from ldm_jax.data import make_iterator, to_global_array
from ldm_jax.data.config import validate_image_size
from ldm_jax.data.image_io import make_grid, save_png, to_uint8
from ldm_jax.models.discriminator import NLayerDiscriminator
from ldm_jax.models.first_stage import make_first_stage
from ldm_jax.parallel.distributed import compile_in_lockstep
from ldm_jax.parallel.mesh import batch_sharding, check_batch_size, make_mesh
from ldm_jax.training import autoencoder_step as step_lib
from ldm_jax.training.autoencoder_loss import Stage1LossConfig
from ldm_jax.training.first_stage_io import first_stage_meta
from ldm_jax.training.loop import Hook, LoopConfig, train_loop
from ldm_jax.training.metrics_writer import MetricWriter
from ldm_jax.training.optim import make_optimizer
from ldm_jax.training.reconstruction import ReconstructFn, latent_scale_factor, make_reconstruct_fn


@dataclasses.dataclass
class AutoencoderTrainResult:
  step: int
  preempted: bool
  train_metrics: dict  # means over the last logging interval
  eval_metrics: dict  # the last validation: val/psnr (dB), val/lpips
  scale_factor: float | None  # of the last saved checkpoint
  workdir: str
  state: Any


def loss_config(section: ml_collections.ConfigDict) -> Stage1LossConfig:
  """The ``Stage1LossConfig`` fields of ``config.loss`` (the rest is the
  discriminator's architecture, ``lpips_weights`` and ``train_logvar``)."""
  names = {f.name for f in dataclasses.fields(Stage1LossConfig)}
  return Stage1LossConfig(**{k: v for k, v in section.items() if k in names})


def make_discriminator(section: ml_collections.ConfigDict) -> NLayerDiscriminator:
  return NLayerDiscriminator(
      input_nc=section.disc_in_channels,
      ndf=section.disc_ndf,
      n_layers=section.disc_num_layers,
      use_actnorm=section.use_actnorm,
  )


class FixedImages:
  """A fixed set of images of one split, evaluated with one compiled program.

  Each process holds its slice of every global batch; results are gathered
  so that every process sees all of them, in order.
  """

  def __init__(self, data_config, split: str, num_images: int, batch_size: int, seed: int, *, shuffle: bool, mesh):
    data_config = copy.deepcopy(data_config)
    data_config.crop, data_config.random_flip = "center", False  # the same images every time
    it = make_iterator(data_config, split, global_batch_size=batch_size, seed=seed, shuffle=shuffle, num_epochs=1)
    self.local_batches = []
    for _ in range(max(num_images // batch_size, 1)):
      try:
        self.local_batches.append(next(it)["image"])
      except StopIteration:
        break
    if not self.local_batches:
      raise ValueError(f"split {split!r} has fewer than one batch ({batch_size}) of images")
    self.sharding = batch_sharding(mesh, 4)
    self.images = np.concatenate([self._gather(self._global(b)) for b in self.local_batches])

  def _global(self, local_images: np.ndarray) -> jax.Array:
    return to_global_array({"image": local_images}, self.sharding)["image"]

  @staticmethod
  def _gather(tree):
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))

  def run(self, fn: ReconstructFn, ae_params, lpips_params) -> dict[str, np.ndarray]:
    batches = [self._global(b) for b in self.local_batches]
    compile_in_lockstep(fn, ae_params, lpips_params, batches[0], name="reconstruct")  # multi-process: start together
    outs = [self._gather(fn(ae_params, lpips_params, b)) for b in batches]
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def needs_lpips(loss_section: ml_collections.ConfigDict) -> bool:
  """Whether training reads LPIPS weights: for the loss, or for validation when a file is given."""
  return loss_section.perceptual_weight > 0 or bool(loss_section.lpips_weights)


def train(config: ml_collections.ConfigDict, workdir: str, *, lpips_params: Any = None) -> AutoencoderTrainResult:
  """Trains (or resumes) the first stage described by ``config`` in ``workdir``.

  ``lpips_params`` (read by the caller, ``ldm_jax.apps.train``, when
  :func:`needs_lpips`) give the perceptual loss and validation LPIPS.
  """
  tc = config.train
  # -------------------------------------------------------- loss and model
  loss_cfg = loss_config(config.loss)
  if loss_cfg.perceptual_weight > 0 and lpips_params is None:
    raise ValueError("loss.perceptual_weight > 0 needs LPIPS params (see ldm_jax.interop.lpips)")
  model_config = config.model.to_dict()
  model = make_first_stage(model_config)
  if loss_cfg.posterior_logvar_init and model_config["kind"] != "kl":
    raise ValueError(
        f"loss.posterior_logvar_init={loss_cfg.posterior_logvar_init} sets a KL posterior's initial log-variance; "
        f"model.kind is {model_config['kind']!r}, which has none (leave it at 0)"
    )
  validate_image_size(config.data.image_size, model.downsample_factor)
  if tc.crop_size:
    validate_image_size(tc.crop_size, model.downsample_factor)
    if tc.crop_size > config.data.image_size:
      raise ValueError(f"train.crop_size {tc.crop_size} exceeds data.image_size {config.data.image_size}")
  disc = make_discriminator(config.loss)

  # ------------------------------------------------------------------ mesh
  mesh = make_mesh(config.mesh)
  check_batch_size(tc.batch_size, mesh)
  check_batch_size(tc.eval_batch_size, mesh, "train.eval_batch_size")

  # ------------------------------------------------------------------ input
  train_it = make_iterator(config.data, config.data.train_split, global_batch_size=tc.batch_size, seed=config.seed)
  sharding = batch_sharding(mesh, 4)
  batches = (to_global_array({"image": b["image"]}, sharding) for b in train_it)
  val_images = FixedImages(
      config.data, config.data.eval_split, tc.num_eval_images, tc.eval_batch_size, config.seed, shuffle=False, mesh=mesh
  )
  scale_images = FixedImages(
      config.data, config.data.train_split, tc.num_scale_images, tc.eval_batch_size, config.seed, shuffle=True,
      mesh=mesh,
  )

  # --------------------------------------------------------- state and step
  tx, _ = make_optimizer(config.optim, tc.num_steps, tc.batch_size)
  disc_tx, _ = make_optimizer(config.optim, tc.num_steps, tc.batch_size)
  tx = step_lib.generator_tx(tx, config.loss.train_logvar and model_config["kind"] == "kl")
  init_fn = step_lib.make_init_fn(model, disc, tx, disc_tx, loss_cfg, scale_images.images[: tc.eval_batch_size])
  step_fn = step_lib.make_train_step(model, disc, loss_cfg, tx, disc_tx, crop_size=tc.crop_size)
  frozen = {"lpips": lpips_params} if loss_cfg.perceptual_weight > 0 else None

  # ------------------------------------------------------ evaluation hook
  reconstruct_fn = make_reconstruct_fn(model)
  writer = MetricWriter(workdir)
  grid_dir = os.path.join(workdir, "reconstructions")
  last = {"eval": {}, "scale": None, "grid": None}

  def validate(state) -> tuple[dict, dict]:
    out = val_images.run(reconstruct_fn, state.params["ae"], lpips_params)
    metrics = {"val/psnr": float(np.mean(out["psnr"]))}
    if "lpips" in out:
      metrics["val/lpips"] = float(np.mean(out["lpips"]))
    return metrics, out

  def evaluate(step: int, state) -> dict:
    metrics, out = validate(state)
    n = min(tc.num_grid_images, len(val_images.images))
    grid = make_grid(np.concatenate([to_uint8(val_images.images[:n]), to_uint8(out["reconstruction"][:n])]), ncols=n)
    if jax.process_index() == 0:
      last["grid"] = save_png(os.path.join(grid_dir, f"step_{step:06d}.png"), grid)
    writer.image(step, "reconstructions", grid)
    last["eval"] = metrics
    return metrics

  # ------------------------------------------------- checkpoint metadata
  def scale_factor(state) -> float:
    out = scale_images.run(reconstruct_fn, state.params["ae"], None)
    return latent_scale_factor(out["latent_mean"], out["latent_var"])

  def meta(state) -> dict:
    last["scale"] = scale_factor(state)
    return first_stage_meta(
        model_config, last["scale"], step=int(jax.device_get(state.step)),
        num_scale_images=len(scale_images.images), config=config.to_dict(),
    )

  # ------------------------------------------------------------------ loop
  loop_cfg = LoopConfig(
      num_steps=tc.num_steps,
      log_every=tc.log_every,
      checkpoint_every=tc.checkpoint_every,
      keep_checkpoints=tc.keep_checkpoints,
      global_batch_size=tc.batch_size,
      loss_keys=step_lib.LOSS_KEYS,
      fsdp_min_size=config.mesh.fsdp_min_size,
      partition_rules=tuple(tuple(r) for r in config.mesh.rules),
      progress_bar=tc.progress_bar,
  )
  try:
    result = train_loop(
        workdir=workdir, mesh=mesh, cfg=loop_cfg, init_fn=init_fn, step_fn=step_fn, batches=batches,
        frozen=frozen, data_iterator=train_it, rng=jax.random.key(config.seed, impl=config.get("prng_impl") or None),
        hooks=[Hook(every=tc.eval_every, fn=evaluate, name="eval")], meta=meta, writer=writer,
    )
  finally:
    writer.close()
  if not last["eval"] and not result.preempted and result.state is not None:
    # E.g. a rerun of a finished run: nothing was trained, but its figures are still reported (not logged).
    last["eval"], last["scale"] = validate(result.state)[0], scale_factor(result.state)

  summary = AutoencoderTrainResult(
      step=result.step, preempted=result.preempted, train_metrics=result.last_metrics,
      eval_metrics=last["eval"], scale_factor=last["scale"], workdir=workdir, state=result.state,
  )
  if jax.process_index() == 0:
    _print_summary(summary, last["grid"], len(val_images.images))
  return summary


def _print_summary(r: AutoencoderTrainResult, grid: str | None, num_val: int) -> None:
  lines = [f"stage-1 training {'preempted' if r.preempted else 'finished'} at step {r.step}"]
  lines.append(f"  checkpoints:     {os.path.join(os.path.abspath(r.workdir), 'checkpoints')}")
  if grid:
    lines.append(f"  reconstructions: {grid}")
  if "val/psnr" in r.eval_metrics:
    extra = f", LPIPS {r.eval_metrics['val/lpips']:.4f}" if "val/lpips" in r.eval_metrics else ""
    lines.append(f"  validation PSNR: {r.eval_metrics['val/psnr']:.2f} dB over {num_val} images{extra}")
  if r.scale_factor is not None:
    lines.append(f"  latent scale factor (stored with the checkpoint): {r.scale_factor:.5f}")
  lines.append(f"  metrics:         {os.path.join(os.path.abspath(r.workdir), 'metrics.jsonl')} and tensorboard/")
  print("\n".join(lines), flush=True)
