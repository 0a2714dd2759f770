"""What ``evaluate.py`` does: images → features → metrics → a JSON report.

Three kinds of input, one report:

- a stage-2 run directory (or published model): N samples with the given
  sampler, conditioned on the reference split's captions / labels, a prompts
  file, or balanced classes;
- a stage-2 model conditioned on an image (super-resolution, inpainting):
  one sample per held-out image of the reference (the split or ``ref_dir``),
  compared with it (PSNR, SSIM, LPIPS) and as a set (FID, IS, ...); see
  ``ldm_jax.evaluation.conditional`` for the low-res inputs and the fixed masks;
- a stage-1 run directory or first-stage copy: reconstructions of the
  reference split or ``ref_dir`` (the paper's autoencoder table: rFID, rIS,
  PSNR, SSIM, and LPIPS, which the paper calls PSIM);
- a folder of images (``images_dir``).

The reference is a dataset split (the run's data config, or ``config``), a
folder (``ref_dir``) or a statistics ``.npz`` (``ref_stats``, FID only).
``save_stats`` writes the reference's statistics for later runs.
"""

import dataclasses
import datetime
import json
import logging
import os
import platform
import sys
from typing import Any

import jax
import ml_collections
import numpy as np

from ldm_jax.config import load_config
from ldm_jax.data.image_io import save_png, to_uint8
from ldm_jax.diffusion.config import parse_guidance_interval
from ldm_jax.evaluation import conditional, feature_metrics, image_sources, precision_recall, recipes, statistics
from ldm_jax.evaluation.clip_score import clip_score
from ldm_jax.evaluation.feature_nets import FEATURE_NETS, FeatureNet
from ldm_jax.evaluation.image_metrics import psnr, ssim
from ldm_jax.interop.clip_model import load_clip_scorer
from ldm_jax.interop.feature_nets import file_sha256, make_feature_net
from ldm_jax.interop.load import load_first_stage, load_pipeline
from ldm_jax.interop.lpips import load_lpips_params
from ldm_jax.models.lpips import make_lpips_fn
from ldm_jax.training.checkpoint import Checkpointer
from ldm_jax.training.first_stage_copy import is_first_stage_copy
from ldm_jax.training.reconstruction import make_reconstruct_fn

METRICS = ("fid", "kid", "is", "pr", "clip_score", "rfid", "ris", "psnr", "ssim", "lpips")
SAMPLE_METRICS = ("fid", "kid", "is", "pr", "clip_score")
FEATURE_METRICS = ("fid", "kid", "is", "pr", "rfid", "ris")
STAGE1_METRICS = ("rfid", "ris", "psnr", "ssim", "lpips")
PAIRED_METRICS = ("psnr", "ssim", "lpips")  # against the held-out image: reconstructions, image-conditioned samples
CONDITIONAL_METRICS = ("fid", "kid", "is", "pr", *PAIRED_METRICS)
NEEDS_REAL_FEATURES = ("kid", "pr")


@dataclasses.dataclass
class EvalRequest:
  checkpoint: str | None = None
  images_dir: str | None = None
  metrics: list[str] = dataclasses.field(default_factory=lambda: ["fid"])
  recipe: str | None = None
  num_samples: int = 1000
  sampler: str = "ddim"
  steps: int = 50
  eta: float = 0.0
  guidance: float = 1.0
  guidance_interval: tuple | list | None = None  # (low, high) model timesteps; None: every step
  seed: int = 0
  prompts_file: str | None = None
  classes: str = "split"
  num_classes: int = 0
  config: str | None = None
  split: str | None = None
  num_real: int = -1
  ref_stats: str | None = None
  ref_dir: str | None = None
  save_stats: str | None = None
  save_images: str | None = None
  feature_net: str = "inception"
  inception_weights: str = ""
  judge_weights: str = ""
  clip_weights: str = ""
  lpips_weights: str = ""
  mask_seed: int = 0
  image_size: int = 0
  batch_size: int = 50
  kid_subset_size: int = 1000
  dtype: str | None = None
  output: str = "eval_report.json"
  command: list[str] = dataclasses.field(default_factory=lambda: list(sys.argv))

  def apply_recipe(self, explicit: set[str] = frozenset()) -> None:
    """Takes the recipe's settings for every field not in ``explicit``."""
    if not self.recipe:
      return
    r = recipes.get_recipe(self.recipe)
    values = dict(num_samples=r.num_samples, sampler=r.sampler, steps=r.steps, eta=r.eta, guidance=r.guidance,
                  metrics=list(r.metrics), split=r.split, classes=r.classes)
    for key, value in values.items():
      if key not in explicit:
        setattr(self, key, value)

  def validate(self) -> None:
    """Checks what can be checked before loading anything."""
    unknown = [m for m in self.metrics if m not in METRICS]
    if unknown:
      raise ValueError(f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}")
    if not self.metrics and not self.save_stats:
      raise ValueError("nothing to do: give --metrics and/or --save_stats")
    if self.checkpoint and self.images_dir:
      raise ValueError("give --checkpoint or --images_dir, not both")
    if not (self.checkpoint or self.images_dir or self.save_stats):
      raise ValueError("give --checkpoint (a run directory) or --images_dir (a folder of images) to evaluate")
    if self.feature_net not in FEATURE_NETS:
      raise ValueError(f"unknown --feature_net {self.feature_net!r}; choose from {FEATURE_NETS}")
    if self.ref_stats and self.ref_dir:
      raise ValueError("give --ref_stats or --ref_dir, not both")
    if self.ref_stats and any(m in NEEDS_REAL_FEATURES for m in self.metrics):
      raise ValueError(f"--ref_stats holds only mean and covariance: {NEEDS_REAL_FEATURES} need the reference "
                       "images (a dataset split or --ref_dir)")
    for path, flag in ((self.ref_stats, "--ref_stats"), (self.prompts_file, "--prompts_file")):
      if path and not os.path.isfile(path):
        raise ValueError(f"{flag} {path!r} does not exist")
    if self.num_samples < 2 or self.batch_size < 1:
      raise ValueError("--num_samples must be >= 2 and --batch_size positive")
    if self.classes not in ("split", "balanced"):
      raise ValueError(f"--classes must be 'split' or 'balanced', got {self.classes!r}")
    if self.guidance_interval is not None:
      self.guidance_interval = parse_guidance_interval(self.guidance_interval)
    if "lpips" in self.metrics and not self.lpips_weights:
      raise ValueError("the lpips metric needs --lpips_weights (VGG16 + LPIPS heads converted with "
                       "python -m ldm_jax.interop.lpips)")


# ----------------------------------------------------------------- metrics
def compute_metrics(metrics, gen: dict[str, np.ndarray], real: dict[str, np.ndarray] | None = None,
                    real_stats: tuple[np.ndarray, np.ndarray] | None = None, *,
                    kid_subset_size: int = 1000) -> dict[str, float]:
  """Generative metrics of ``gen`` features (``pool``, ``logits``) against ``real`` ones or statistics.

  ``rfid`` is FID where ``gen`` holds reconstructions of ``real``.
  """
  out = {}
  want = set(metrics)
  if want & {"fid", "rfid"}:
    mu_r, sigma_r = real_stats if real_stats is not None else statistics.mean_and_covariance(real["pool"])
    fid = feature_metrics.frechet_distance(*statistics.mean_and_covariance(gen["pool"]), mu_r, sigma_r)
    out["rfid" if "rfid" in want else "fid"] = fid
  if "kid" in want:
    size = min(kid_subset_size, len(gen["pool"]), len(real["pool"]))
    out["kid_mean"], out["kid_std"] = feature_metrics.kernel_inception_distance(
        gen["pool"], real["pool"], subset_size=size)
    out["kid_subset_size"] = size
  if "is" in want:
    if "logits" not in gen:
      raise ValueError("the Inception Score needs class logits: use --feature_net=inception")
    out["is_mean"], out["is_std"] = feature_metrics.inception_score(gen["logits"], splits=min(10, len(gen["logits"])))
  if "pr" in want:
    out["precision"], out["recall"] = precision_recall.precision_recall(real["pool"], gen["pool"])
  return out


# --------------------------------------------------------------- the run
def _run_kind(checkpoint: str) -> tuple[str, int | None, dict | None]:
  """``("samples" | "reconstructions", step, meta)`` of a checkpoint path."""

  if not os.path.exists(checkpoint):
    raise FileNotFoundError(f"--checkpoint {checkpoint!r} does not exist")
  if os.path.isdir(checkpoint) and is_first_stage_copy(checkpoint):  # a saved first stage (reconstruct.py's input)
    return "reconstructions", None, None
  ckpt_dir = os.path.join(checkpoint, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    return "samples", None, None  # a published model: ldm_jax.interop.load dispatches it
  checkpointer = Checkpointer(ckpt_dir, async_save=False)
  try:
    step = checkpointer.latest_step()
    meta = checkpointer.read_meta(step) if step is not None else None
  finally:
    checkpointer.close()
  if step is None:
    raise FileNotFoundError(f"{checkpoint} is a run directory without checkpoints yet")
  return ("reconstructions" if (meta or {}).get("stage") == "autoencoder" else "samples"), step, meta


def _data_config(request: EvalRequest, meta: dict | None) -> ml_collections.ConfigDict | None:
  if request.config:

    return load_config(request.config).data
  if meta and "config" in meta:
    return ml_collections.ConfigDict(meta["config"]["data"])
  return None


def _versions() -> dict[str, str]:
  import importlib.metadata as md

  out = {"python": platform.python_version()}
  for name in ("jax", "jaxlib", "flax", "numpy", "scipy", "ldm_jax"):
    try:
      out[name] = md.version(name)
    except md.PackageNotFoundError:
      pass
  return out


def _reference(request, data_config, extract, image_size):
  """``(features | None, stats | None, scan | None, description)`` of the reference images."""
  if request.ref_stats:
    desc = {"kind": "stats", "stats_file": os.path.abspath(request.ref_stats),
            "stats_sha256": file_sha256(request.ref_stats)}
    return None, statistics.load_statistics(request.ref_stats), None, desc
  if request.ref_dir:
    feats = image_sources.extract_all(extract, (b for b, _ in image_sources.folder_batches(
        request.ref_dir, size=image_size, batch_size=request.batch_size)))
    if request.num_real > 0:
      feats = {k: v[: request.num_real] for k, v in feats.items()}
    desc = {"kind": "folder", "path": os.path.abspath(request.ref_dir), "num_images": len(feats["pool"])}
    return feats, None, None, desc
  if data_config is None:
    raise ValueError("no reference: give --ref_stats, --ref_dir, or --config naming a dataset (a run directory "
                     "brings its own data config)")
  split = request.split or data_config.eval_split
  scan = image_sources.scan_split(image_sources.split_batches(
      data_config, split, batch_size=request.batch_size, num=request.num_real), extract)
  desc = {"kind": "split", "split": split, "num_images": scan.count,
          "data": {k: data_config.get(k) for k in ("source", "name", "path", "data_dir", "image_size")}}
  return scan.features, None, scan, desc


def run(request: EvalRequest) -> dict[str, Any]:
  """Evaluates as ``request`` says; writes and returns the report."""
  request.validate()
  metrics = list(request.metrics)
  kind, step, meta = _run_kind(request.checkpoint) if request.checkpoint else (
      "folder" if request.images_dir else "statistics", None, None)
  if kind == "reconstructions":
    bad = [m for m in metrics if m not in STAGE1_METRICS]
  elif kind == "samples":
    bad = [m for m in metrics if m in ("rfid", "ris")]  # paired metrics: checked once the model is known
  else:
    bad = [m for m in metrics if m in STAGE1_METRICS]
  if bad:
    raise ValueError(f"metrics {bad} do not apply to {kind}: {STAGE1_METRICS} are for stage-1 run directories, "
                     f"{SAMPLE_METRICS} for samples and folders, {CONDITIONAL_METRICS} for super-resolution and "
                     "inpainting models")
  data_config = _data_config(request, meta)
  needs_features = bool(request.save_stats) or any(m in FEATURE_METRICS for m in metrics)
  net: FeatureNet | None = make_feature_net(
      request.feature_net, inception_weights=request.inception_weights,
      judge_weights=request.judge_weights) if needs_features else None
  extract = net.extractor() if net is not None else None
  scorer = None
  if "clip_score" in metrics:

    scorer = load_clip_scorer(request.clip_weights)
  gen_extract = _combined(extract, scorer.extractor() if scorer is not None else None)
  report: dict[str, Any] = {
      "command": request.command, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
      "mode": kind, "recipe": request.recipe, "request": dataclasses.asdict(request),
      "feature_net": net.describe() if net is not None else None, "versions": _versions(),
      "clip": {"path": scorer.path, "weights_sha256": file_sha256(scorer.weights_file)} if scorer else None,
      "devices": [str(d) for d in jax.devices()],
  }
  if request.checkpoint:
    report["checkpoint"] = {"path": os.path.abspath(request.checkpoint), "step": step}

  pipeline = None
  if kind == "samples":
    pipeline = load_pipeline(request.checkpoint, compute_dtype=request.dtype)
    if conditional.task_of(pipeline.model) is not None:
      kind = report["mode"] = conditional.task_of(pipeline.model)
  lpips_params = load_lpips_params(request.lpips_weights) if "lpips" in metrics else None
  if kind == "reconstructions":
    report.update(_evaluate_reconstructions(request, data_config, extract, metrics, lpips_params))
  elif kind in conditional.TASKS.values():
    report.update(_evaluate_conditional(request, pipeline, data_config, extract, metrics, lpips_params))
  else:
    paired = [m for m in metrics if m in PAIRED_METRICS]
    if paired:
      raise ValueError(f"metrics {paired} compare each image with its original: they apply to stage-1 runs and "
                       "super-resolution / inpainting models, not to these samples")
    image_size = request.image_size or (data_config.image_size if data_config is not None else 0)
    if not image_size and request.images_dir:
      image_size = image_sources.first_image_size(request.images_dir)
    real_needed = needs_features and (any(m in SAMPLE_METRICS for m in metrics) or request.save_stats)
    real, stats, scan, ref_desc = (None, None, None, None)
    if real_needed or kind == "samples":
      real, stats, scan, ref_desc = _reference(request, data_config, extract if real_needed else None, image_size)
      report["reference"] = ref_desc
    if request.save_stats and real is not None:
      statistics.save_statistics(request.save_stats, *statistics.mean_and_covariance(real["pool"]))
      report["saved_stats"] = os.path.abspath(request.save_stats)
    gen, texts = None, []
    if kind == "samples":
      gen, texts, report["sampling"] = _sample_features(request, pipeline, scan, gen_extract, data_config)
    elif kind == "folder":
      def batches():
        for images, captions in image_sources.folder_batches(
            request.images_dir, size=image_size, batch_size=request.batch_size):
          texts.extend(captions)
          yield images
      gen = image_sources.extract_all(gen_extract, batches())
      report["images"] = {"path": os.path.abspath(request.images_dir), "image_size": image_size}
    if gen is not None:
      report["num_generated"] = len(next(iter(gen.values())))
      report["metrics"] = compute_metrics([m for m in metrics if m != "clip_score"], gen, real, stats,
                                          kid_subset_size=request.kid_subset_size)
      if scorer is not None:
        report["metrics"]["clip_score"] = _clip_score(scorer, gen["image_embeds"], texts)
  os.makedirs(os.path.dirname(os.path.abspath(request.output)), exist_ok=True)
  with open(request.output, "w") as f:
    json.dump(report, f, indent=2, default=str)
  logging.info("evaluation report: %s", json.dumps(report.get("metrics", {})))
  return report


def _sample_features(request: EvalRequest, pipeline, scan, extract, data_config) -> tuple[dict, list[str], dict]:
  model = pipeline.model
  if model.concat_kind != "none":
    raise ValueError(f"this model is conditioned on {model.concat_kind!r} maps: sample it with sample.py and "
                     "evaluate the folder with --images_dir")
  prompts = []
  if request.prompts_file:
    with open(request.prompts_file) as f:
      prompts = [line.strip() for line in f if line.strip()]
  wants_split = ((model.cond_key == "tokens" and not prompts)
                 or (model.cond_key == "label" and request.classes == "split"))
  if scan is None and wants_split and data_config is not None:
    # The reference is a statistics file: read the split for its captions / labels only.
    scan = image_sources.scan_split(image_sources.split_batches(
        data_config, request.split or data_config.eval_split, batch_size=request.batch_size, num=request.num_samples))
  num_classes = request.num_classes
  if not num_classes and model.cond_key == "label":
    num_classes = model.cond_stage.module.null_class  # the classes before the null class
  conditions = image_sources.conditions_for(
      model.cond_key, request.num_samples, captions=scan.captions if scan else [], labels=scan.labels if scan else [],
      prompts=prompts, num_classes=num_classes, classes=request.classes)
  # The checkpoint's scheduler settings (spacing, offset) with the requested sampler and steps.
  sampler = pipeline.sampler_config(request.sampler, request.steps, guidance_interval=request.guidance_interval)
  batches = image_sources.sample_batches(
      pipeline, conditions, num=request.num_samples, batch_size=request.batch_size, sampler=sampler,
      guidance_scale=request.guidance, eta=request.eta, seed=request.seed)
  if request.save_images:
    batches = image_sources.saving(batches, request.save_images, conditions)
  gen = image_sources.extract_all(extract, batches)
  texts = [str(c) for c in conditions] if model.cond_key == "tokens" else []
  source = ("prompts_file" if prompts else "split_captions") if model.cond_key == "tokens" else (
      f"classes_{request.classes}" if model.cond_key == "label" else "unconditional")
  desc = {"sampler": dataclasses.asdict(sampler), "eta": request.eta, "guidance_scale": request.guidance,
          "seed": request.seed, "num_samples": request.num_samples, "batch_size": request.batch_size,
          "conditions": source, "image_size": pipeline.image_size}
  if request.save_images:
    desc["saved_images"] = os.path.abspath(request.save_images)
  if prompts:
    desc["prompts_sha256"] = file_sha256(request.prompts_file)
  return gen, texts, desc


def _combined(extract, clip_extract):
  """One function of an image batch giving both networks' outputs."""
  if extract is None or clip_extract is None:
    return extract or clip_extract
  return lambda images: {**extract(images), **clip_extract(images)}


def _clip_score(scorer, image_embeds: np.ndarray, texts: list[str]) -> float:

  if len(texts) != len(image_embeds) or not all(texts):
    raise ValueError("clip_score needs a caption for every image: a text-conditional model, or a folder with a "
                     "same-name .txt caption beside each image")
  return clip_score(image_embeds, scorer.embed_texts(texts))


def _held_out_batches(request: EvalRequest, data_config, image_size: int, num: int):
  """``(batches of [-1, 1] float images, description)`` of the reference: ``ref_dir`` or the split."""
  if request.ref_dir:
    def from_folder():
      left = num
      for images, _ in image_sources.folder_batches(request.ref_dir, size=image_size, batch_size=request.batch_size):
        if left == 0:
          return
        images = images[:left] if left > 0 else images
        left -= len(images)
        yield images.astype(np.float32) / 127.5 - 1.0
    return from_folder(), {"kind": "folder", "path": os.path.abspath(request.ref_dir)}
  if data_config is None:
    raise ValueError("no held-out images: give --ref_dir or --config naming a dataset (a run directory brings its "
                     "own data config)")
  split = request.split or data_config.eval_split
  batches = (b["image"] for b in image_sources.split_batches(data_config, split, batch_size=request.batch_size,
                                                                num=num))
  return batches, {"kind": "split", "split": split}


class _Paired:
  """Per-image metrics against the original and features of both sides, accumulated over batches."""

  def __init__(self, metrics, extract, lpips_params):
    self.metrics, self.extract, self.lpips_params = metrics, extract, lpips_params
    self.values = {m: [] for m in PAIRED_METRICS if m in metrics}
    self.real, self.gen = [], []
    self._lpips = jax.jit(lambda params, x, y: make_lpips_fn(params)(x, y)) if lpips_params is not None else None

  def add(self, real_uint8: np.ndarray, gen_uint8: np.ndarray, lpips: np.ndarray | None = None) -> None:
    if "psnr" in self.values:
      self.values["psnr"].append(np.asarray(psnr(real_uint8, gen_uint8, value_range=(0.0, 255.0)), np.float64))
    if "ssim" in self.values:
      self.values["ssim"].append(np.asarray(ssim(real_uint8, gen_uint8, value_range=(0.0, 255.0)), np.float64))
    if "lpips" in self.values:
      if lpips is None:
        to_unit = lambda a: a.astype(np.float32) / 127.5 - 1.0  # noqa: E731
        lpips = self._lpips(self.lpips_params, to_unit(real_uint8), to_unit(gen_uint8))
      self.values["lpips"].append(np.asarray(lpips, np.float64))
    if self.extract is not None:
      self.real.append(self.extract(real_uint8))
      self.gen.append(self.extract(gen_uint8))

  def count(self) -> int:
    return int(sum(map(len, next(iter(self.values.values()))))) if self.values else int(sum(
        len(next(iter(g.values()))) for g in self.gen))

  def results(self) -> dict[str, float]:
    out = {}
    for name, parts in self.values.items():
      v = np.concatenate(parts)
      out.update({f"{name}_mean": float(v.mean()), f"{name}_std": float(v.std())})
    return out

  def features(self) -> tuple[dict, dict]:
    join = lambda parts: jax.tree.map(lambda *a: np.concatenate(a), *parts)  # noqa: E731
    return join(self.real), join(self.gen)


def _evaluate_conditional(request: EvalRequest, pipeline, data_config, extract, metrics, lpips_params) -> dict:
  """One sample per held-out image of a super-resolution / inpainting model, compared with it."""
  task = conditional.task_of(pipeline.model)
  bad = [m for m in metrics if m not in CONDITIONAL_METRICS]
  if bad:
    raise ValueError(f"metrics {bad} do not apply to a {task} model; choose from {', '.join(CONDITIONAL_METRICS)}")
  image_size = request.image_size or pipeline.image_size
  batches, ref_desc = _held_out_batches(request, data_config, image_size, request.num_samples)
  sampler = pipeline.sampler_config(request.sampler, request.steps, guidance_interval=request.guidance_interval)
  pairs = conditional.paired_samples(pipeline, batches, batch_size=request.batch_size, mask_seed=request.mask_seed,
                                     sampler=sampler, guidance_scale=request.guidance, eta=request.eta,
                                     seed=request.seed)
  acc = _Paired(metrics, extract, lpips_params)
  index = 0
  for real, gen, _ in pairs:
    if request.save_images:
      for i, image in enumerate(gen):
        save_png(os.path.join(request.save_images, f"{index + i:05d}.png"), image)
    acc.add(real, gen)
    index += len(gen)
  if index == 0:
    raise ValueError(f"the reference ({ref_desc}) holds no images")
  out_metrics = acc.results()
  feature_wanted = [m for m in metrics if m in FEATURE_METRICS]
  if feature_wanted:
    real, gen = acc.features()
    out_metrics.update(compute_metrics(feature_wanted, gen, real, kid_subset_size=request.kid_subset_size))
  sampling = {"sampler": dataclasses.asdict(sampler), "eta": request.eta, "guidance_scale": request.guidance,
              "seed": request.seed, "num_samples": index, "batch_size": request.batch_size, "image_size": image_size,
              "inputs": ("held-out images bicubically downsampled as in training" if task == "super_resolution"
                         else f"fixed random rectangular holes from mask_seed {request.mask_seed}")}
  if request.save_images:
    sampling["saved_images"] = os.path.abspath(request.save_images)
  return {"task": task, "reference": {**ref_desc, "num_images": index}, "sampling": sampling,
          "num_generated": index, "metrics": out_metrics}


def _evaluate_reconstructions(request: EvalRequest, data_config, extract, metrics, lpips_params=None) -> dict:
  """The autoencoder table of a first stage's reconstructions of the reference (split or ``ref_dir``):
  rFID, rIS, PSNR, SSIM and LPIPS (the paper's PSIM)."""
  model, variables, _, _ = load_first_stage(request.checkpoint)
  fn = make_reconstruct_fn(model)
  bs = request.batch_size
  size = request.image_size or (data_config.image_size if data_config is not None else 0)
  if request.ref_dir and not size:
    size = image_sources.first_image_size(request.ref_dir)
  batches, ref_desc = _held_out_batches(request, data_config, size, request.num_real)
  acc = _Paired(metrics, extract, None)
  for x in batches:
    n = len(x)
    padded = np.concatenate([x, np.repeat(x[-1:], bs - n, axis=0)])  # one compiled shape
    out = jax.device_get(fn(variables["params"], lpips_params, padded))
    acc.add(to_uint8(x), to_uint8(out["reconstruction"])[:n], out["lpips"][:n] if lpips_params is not None else None)
  if not acc.gen and not any(acc.values.values()):
    raise ValueError(f"the reference ({ref_desc}) holds no images")
  out = {"reference": {**ref_desc, "num_images": acc.count()}, "metrics": acc.results()}
  if extract is not None:
    real, rec = acc.features()
    if "rfid" in metrics:
      out["metrics"].update(compute_metrics(["rfid"], rec, real))
    if "ris" in metrics:
      is_ = compute_metrics(["is"], rec)
      out["metrics"].update(ris_mean=is_["is_mean"], ris_std=is_["is_std"])
    if request.save_stats:
      statistics.save_statistics(request.save_stats, *statistics.mean_and_covariance(real["pool"]))
      out["saved_stats"] = os.path.abspath(request.save_stats)
  return out
