"""Periodic evaluation during stage-2 training: FID of EMA samples, logged as ``eval/fid``.

Every ``config.eval.every`` steps the hook samples ``config.eval.num_samples``
images with the EMA weights through the same ``LDMPipeline`` program the
sample grids and ``sample.py`` use, conditioned on the eval split's captions
or labels, and compares their features with the eval split's statistics,
computed once when training starts (or read from ``config.eval.ref_stats``).
Small N gives a biased FID (higher than the 50k number): it tracks progress
within one run, it is not comparable with published values.
"""

import dataclasses
import logging
from typing import Any

import ml_collections

from ldm_jax.diffusion.config import SamplerConfig
from ldm_jax.evaluation import image_sources, statistics
from ldm_jax.evaluation.feature_metrics import frechet_distance
from ldm_jax.evaluation.feature_nets import FeatureNet
from ldm_jax.nn.lora import LoRAConfig
from ldm_jax.pipeline import LDMPipeline
from ldm_jax.training.loop import Hook
from ldm_jax.training.lora import model_params
from ldm_jax.training.metrics_writer import MetricWriter


@dataclasses.dataclass
class EvalHook:
  pipeline: LDMPipeline
  extract: Any
  real_stats: tuple[Any, Any]
  conditions: list | None
  sampler: SamplerConfig
  eval_config: ml_collections.ConfigDict
  guidance_scale: float
  writer: MetricWriter
  lora: LoRAConfig | None = None

  def __call__(self, step: int, state) -> dict[str, float]:
    trained = state.ema_params if state.ema_params is not None else state.params
    self.pipeline.params = model_params(trained, self.pipeline.frozen, self.lora)
    e = self.eval_config
    batches = image_sources.sample_batches(
        self.pipeline, self.conditions, num=e.num_samples, batch_size=e.batch_size, sampler=self.sampler,
        guidance_scale=self.guidance_scale, eta=e.eta, seed=e.seed)
    gen = image_sources.extract_all(self.extract, batches)
    fid = frechet_distance(*statistics.mean_and_covariance(gen["pool"]), *self.real_stats)
    metrics = {"eval/fid": fid}
    self.writer.scalars(step, metrics)
    return metrics


def make_eval_hook(config: ml_collections.ConfigDict, pipeline: LDMPipeline, writer: MetricWriter,
                   sampler: SamplerConfig, net: FeatureNet, lora: LoRAConfig | None = None) -> Hook:
  """The hook for ``config.eval`` (``every`` > 0) with the feature network
  ``net`` of ``config.eval.feature_net``; reads or computes the reference
  statistics now."""
  e = config.eval
  if e.num_samples < 2:
    raise ValueError(f"config.eval.num_samples must be >= 2 for a covariance, got {e.num_samples}")
  extract = net.extractor(pipeline.mesh)
  split = e.split or config.data.eval_split
  model = pipeline.model
  need_conditions = model.cond_key is not None
  if e.ref_stats:
    real_stats = statistics.load_statistics(e.ref_stats)
    scan = image_sources.scan_split(image_sources.split_batches(
        config.data, split, batch_size=e.batch_size, num=e.num_samples)) if need_conditions else None
  else:
    scan = image_sources.scan_split(image_sources.split_batches(
        config.data, split, batch_size=e.batch_size, num=e.num_real), extract)
    real_stats = statistics.mean_and_covariance(scan.features["pool"])
    logging.info("eval: reference statistics of %d images of split %r", scan.count, split)
  num_classes = model.cond_stage.module.null_class if model.cond_key == "label" else 0
  conditions = image_sources.conditions_for(
      model.cond_key, e.num_samples, captions=scan.captions if scan else [], labels=scan.labels if scan else [],
      num_classes=num_classes)
  guidance = e.guidance_scale if e.guidance_scale >= 0 else config.sample.guidance_scale
  sampler = dataclasses.replace(sampler, num_steps=e.num_steps, sampler=e.sampler)
  hook = EvalHook(pipeline, extract, real_stats, conditions, sampler, e, guidance, writer, lora)
  return Hook(e.every, hook, "eval")
