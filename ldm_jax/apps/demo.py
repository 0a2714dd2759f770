"""The README's first command: both stages on the built-in shapes dataset,
then sampling held-out prompts and judging them.

Phases (each resumes from its checkpoints when the command is rerun):

1. stage 1: a small KL-f4 autoencoder (``configs/autoencoder.py:demo``);
2. stage 2: a text-conditional LDM on its latents
   (``configs/ldm.py:shapes_txt2img`` on single-object scenes, latents cached once);
3. sampling with classifier-free guidance: single-object prompts for the
   colour-shape pairs the LDM never saw (``WITHHELD_PAIRS``) and, as a
   control, for pairs it saw;
4. judging: a small CNN trained on renders of every pair names the colour
   and shape of each generated image; the Fréchet distance in its feature
   space compares generated with rendered images of the same prompts. The
   judge also reads its renders after the autoencoder's round trip: the most
   stage 2 can reach through that decoder.

Everything lands in the run folder: ``autoencoder/``, ``ldm/`` (checkpoints,
metrics, sample grids), ``heldout_samples.png``, ``demo_results.json``.
"""

import ast
import dataclasses
import json
import os
import time

import jax
import ml_collections
import numpy as np

from ldm_jax.apps import train as train_app
from ldm_jax.config import load_config
from ldm_jax.data import captioned_shapes as shapes
from ldm_jax.data.image_io import make_grid, save_png, to_uint8
from ldm_jax.diffusion.config import SamplerConfig
from ldm_jax.evaluation import shapes_judge
from ldm_jax.interop.load import load_first_stage, load_pipeline
from ldm_jax.training.reconstruction import make_reconstruct_fn

# The experiment configs live next to the package in the repository.
# The repository's configs/ (ldm_jax/apps/demo.py -> ../../configs).
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
RESULTS_FILE = "demo_results.json"
GRID_FILE = "heldout_samples.png"
SIZE_NAMES = tuple(shapes.SIZES)
# The bar for prompt following on held-out prompts.
ACCURACY_BAR = 0.8


class DemoPreempted(RuntimeError):
  """A training stage stopped on SIGTERM (its checkpoint saved); rerunning resumes it."""


@dataclasses.dataclass(frozen=True)
class DemoSettings:
  """What the demo trains and how it samples and judges."""

  tiny: bool = False  # seconds-long stages (tests); the figures then mean nothing
  images_per_prompt: int = 8  # per held-out prompt (6 pairs x 2 sizes)
  seen_images_per_pair: int = 2  # control prompts: each seen pair once per size
  sampler: str = "ddim"
  num_steps: int = 50
  guidance_scale: float = 6.0  # judged better than 3.0 (docs/demo-results.md)
  seed: int = 0
  judge_steps: int = 600
  judge_renders_per_pair: int = 150  # training renders of each colour-shape pair (see train_judge)
  ae_overrides: tuple[tuple[str, object], ...] = ()  # ("train.num_steps", 100), ...
  ldm_overrides: tuple[tuple[str, object], ...] = ()


def parse_override(text: str) -> tuple[str, object]:
  """``"train.num_steps=10000"`` -> ``("train.num_steps", 10000)``.

  The value is read as a Python literal (numbers, tuples, quoted strings);
  anything else is taken as a bare string, so ``optim.schedule=constant`` works.
  """
  key, sep, value = text.partition("=")
  if not sep or not key:
    raise ValueError(f"expected KEY=VALUE (e.g. train.num_steps=5000), got {text!r}")
  try:
    return key.strip(), ast.literal_eval(value.strip())
  except (ValueError, SyntaxError):
    return key.strip(), value.strip()


def _override(config: ml_collections.ConfigDict, overrides) -> None:
  for key, value in overrides:
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
        raise KeyError(f"unknown config key {key!r}")
      node = node[p]
    if leaf not in node:
      raise KeyError(f"unknown config key {key!r}")
    try:
      node[leaf] = value
    except TypeError as e:
      raise TypeError(f"config key {key!r} holds {type(node[leaf]).__name__}, not {value!r}") from e


def demo_configs(workdir: str, settings: DemoSettings) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
  """(stage-1 config, stage-2 config) of the demo run in ``workdir``."""
  suffix = ",tiny" if settings.tiny else ""
  ae = load_config(os.path.join(CONFIG_DIR, f"autoencoder.py:demo{suffix}"))
  _override(ae, settings.ae_overrides)  # first: stage 2 follows the first stage's shapes
  ldm = load_config(os.path.join(CONFIG_DIR, f"ldm.py:shapes_txt2img{suffix}"))
  # Stage 2 trains on the demo's own first stage, at its resolution.
  ldm.first_stage.update(checkpoint=os.path.join(workdir, "autoencoder"), random_init=False, scale_factor=-1.0)
  ldm.data.update(image_size=ae.data.image_size)
  ldm.data.shapes.update(ae.data.shapes.to_dict())
  # The judged prompts name one object, and at this budget (40k examples) single-object scenes teach
  # them better than scenes of 1-3 objects (docs/demo-results.md).
  ldm.data.shapes.max_objects = 1
  ldm.sample.prompts = ("a large red circle", "a small blue square", "a large green star")
  ldm.unet.image_size = ae.data.image_size // 2 ** (len(ae.model.ddconfig.ch_mult) - 1)
  ldm.unet.update(in_channels=ae.model.embed_dim, out_channels=ae.model.embed_dim)
  _override(ldm, settings.ldm_overrides)
  return ae, ldm


def judged_prompts(settings: DemoSettings) -> dict[str, list[tuple[str, tuple[str, str]]]]:
  """``{"heldout": [(prompt, (colour, shape)), ...], "seen": [...]}``."""
  heldout = [
      (shapes.single_object_prompt(c, s, size), (c, s))
      for c, s in shapes.WITHHELD_PAIRS
      for size in SIZE_NAMES
      for _ in range(settings.images_per_prompt)
  ]
  seen_pairs = [(c, s) for c, s in shapes_judge.ALL_PAIRS if not shapes.is_withheld(c, s)]
  seen = [
      (shapes.single_object_prompt(c, s, SIZE_NAMES[i % len(SIZE_NAMES)]), (c, s))
      for c, s in seen_pairs
      for i in range(settings.seen_images_per_pair)
  ]
  return {"heldout": heldout, "seen": seen}


def _timed(timings: dict, name: str, fn, *args, **kw):
  start = time.perf_counter()
  out = fn(*args, **kw)
  timings[name] = round(time.perf_counter() - start, 1)
  return out


def _stop_if_preempted(stage: str, result) -> None:
  # Sampling and judging a half-trained model would only cost the time a preempted job lacks.
  if result.preempted:
    raise DemoPreempted(f"{stage} was stopped (SIGTERM) at step {result.step}, its checkpoint saved; "
                        "run the same command to resume")


def run_demo(workdir: str, settings: DemoSettings = DemoSettings()) -> dict:
  """Runs (or resumes) every phase; returns the report written to ``demo_results.json``."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  ae_config, ldm_config = demo_configs(workdir, settings)
  timings: dict[str, float] = {}

  _banner("1/4 stage 1: autoencoder")
  ae_result = _timed(timings, "stage1_s", train_app.train_first_stage, ae_config, os.path.join(workdir, "autoencoder"))
  _stop_if_preempted("stage 1", ae_result)
  _banner("2/4 stage 2: text-conditional latent diffusion model")
  ldm_result = _timed(timings, "stage2_s", train_app.train_latent_diffusion, ldm_config, os.path.join(workdir, "ldm"))
  _stop_if_preempted("stage 2", ldm_result)

  _banner("3/4 sampling held-out and seen prompts")
  pipeline = load_pipeline(os.path.join(workdir, "ldm"))
  prompts = judged_prompts(settings)
  sampler = SamplerConfig(sampler=settings.sampler, num_steps=settings.num_steps,
                          prediction_type=pipeline.prediction_type)
  everything = prompts["heldout"] + prompts["seen"]
  images = _timed(timings, "sampling_s", pipeline.text_to_image, [p for p, _ in everything], sampler=sampler,
                  guidance_scale=settings.guidance_scale, seed=settings.seed)
  generated = {"heldout": images[: len(prompts["heldout"])], "seen": images[len(prompts["heldout"]):]}
  grid_path = _save_heldout_grid(workdir, generated["heldout"], settings.images_per_prompt, prompts["heldout"])

  _banner("4/4 judging colour and shape")
  image_size = ae_config.data.image_size
  judge = _timed(timings, "judge_training_s", shapes_judge.train_judge, image_size,
                 steps=settings.judge_steps, per_pair=settings.judge_renders_per_pair, seed=settings.seed)
  first_stage_colour, first_stage_shape = _timed(
      timings, "first_stage_check_s", first_stage_accuracy, judge, os.path.join(workdir, "autoencoder"),
      image_size, settings.seed)
  results = {}
  for name, pairs_prompts in prompts.items():
    pairs = [pair for _, pair in pairs_prompts]
    real = _rendered(sorted(set(pairs)), max(len(pairs) // len(set(pairs)), 8), image_size, settings.seed + 10)
    results[name] = shapes_judge.judge_generated(judge, generated[name], pairs, real)

  report = {
      "settings": dataclasses.asdict(settings),
      "autoencoder": {
          "steps": ae_result.step,
          "val_psnr_db": ae_result.eval_metrics.get("val/psnr"),
          "scale_factor": ae_result.scale_factor,
      },
      "ldm": {"steps": ldm_result.step, "last_metrics": _floats(ldm_result.last_metrics)},
      "judge": {
          "heldout_colour_accuracy": judge.heldout_colour_accuracy,
          "heldout_shape_accuracy": judge.heldout_shape_accuracy,
          "first_stage_colour_accuracy": first_stage_colour,
          "first_stage_shape_accuracy": first_stage_shape,
          "training_steps": settings.judge_steps,
          "renders_per_pair": settings.judge_renders_per_pair,
      },
      "heldout_prompts": results["heldout"],
      "seen_prompts": results["seen"],
      "bar": {
          "accuracy": ACCURACY_BAR,
          "passed": bool(results["heldout"]["colour_accuracy"] >= ACCURACY_BAR
                         and results["heldout"]["shape_accuracy"] >= ACCURACY_BAR),
      },
      "timings_s": timings,
      "files": {"grid": grid_path, "autoencoder": os.path.join(workdir, "autoencoder"),
                "ldm": os.path.join(workdir, "ldm")},
      "devices": [str(d) for d in jax.devices()],
  }
  if jax.process_index() == 0:
    with open(os.path.join(workdir, RESULTS_FILE), "w") as f:
      json.dump(report, f, indent=2)
    print(summary(report, workdir), flush=True)
  return report


def first_stage_round_trip(autoencoder_dir: str, images: np.ndarray) -> np.ndarray:
  """D(E(x)) of images in [-1, 1] through a stage-1 run's weights (posterior
  mean), passed through uint8 as generated images are."""

  model, variables, _, _ = load_first_stage(autoencoder_dir)
  reconstruct = make_reconstruct_fn(model)
  decoded = np.concatenate([np.asarray(reconstruct(variables["params"], None, images[i:i + 64])["reconstruction"])
                            for i in range(0, len(images), 64)])
  return to_uint8(decoded).astype(np.float32) / 127.5 - 1.0


def first_stage_accuracy(judge: shapes_judge.TrainedJudge, autoencoder_dir: str, image_size: int,
                         seed: int) -> tuple[float, float]:
  """The judge's (colour, shape) accuracy on its fresh renders after the first
  stage's encode / decode: the most stage 2 can reach through that decoder."""
  images, colours, kinds = shapes_judge.fresh_renders(image_size, seed)
  return judge.accuracy(first_stage_round_trip(autoencoder_dir, images), colours, kinds)


def _rendered(pairs, per_pair: int, image_size: int, seed: int) -> np.ndarray:
  images, _, _ = shapes_judge.render_single_objects(pairs, per_pair, image_size, seed)
  return to_uint8(images)


def _save_heldout_grid(workdir: str, images: np.ndarray, per_prompt: int, prompts) -> str:
  path = os.path.join(workdir, GRID_FILE)
  if jax.process_index() == 0:
    rows = [prompts[i][0] for i in range(0, len(prompts), per_prompt)]
    save_png(path, make_grid(images, ncols=per_prompt), {"rows": rows})
  return path


def _floats(metrics: dict) -> dict:
  return {k: float(v) for k, v in (metrics or {}).items()}


def _banner(text: str) -> None:
  print(f"\n=== {text} ===", flush=True)


def summary(report: dict, workdir: str) -> str:
  """The human-readable end of the demo."""
  h, s, j = report["heldout_prompts"], report["seen_prompts"], report["judge"]
  ae = report["autoencoder"]
  psnr = f"{ae['val_psnr_db']:.2f} dB" if ae["val_psnr_db"] is not None else "n/a"
  lines = [
      "",
      "=== demo finished ===",
      f"autoencoder: {ae['steps']} steps, validation PSNR {psnr}",
      f"LDM: {report['ldm']['steps']} steps",
      f"judge accuracy on fresh renders: colour {j['heldout_colour_accuracy']:.1%}, "
      f"shape {j['heldout_shape_accuracy']:.1%}; after the autoencoder (the most stage 2 can reach): "
      f"colour {j['first_stage_colour_accuracy']:.1%}, shape {j['first_stage_shape_accuracy']:.1%}",
      f"held-out prompts (colour-shape pairs never seen in training), {h['num_images']} images:",
      f"  colour {h['colour_accuracy']:.1%}, shape {h['shape_accuracy']:.1%}, both {h['both_accuracy']:.1%}, "
      f"Fréchet distance {h['frechet_distance']:.2f}  "
      f"(bar {ACCURACY_BAR:.0%}: {'passed' if report['bar']['passed'] else 'NOT passed'})",
      f"seen prompts (control), {s['num_images']} images:",
      f"  colour {s['colour_accuracy']:.1%}, shape {s['shape_accuracy']:.1%}, both {s['both_accuracy']:.1%}, "
      f"Fréchet distance {s['frechet_distance']:.2f}",
      "time: " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in report["timings_s"].items()),
      f"held-out samples: {report['files']['grid']} (one row per prompt)",
      f"checkpoints:      {report['files']['autoencoder']}/checkpoints, {report['files']['ldm']}/checkpoints",
      f"figures:          {os.path.join(workdir, RESULTS_FILE)}",
      f"sample more:      python sample.py --checkpoint {report['files']['ldm']} --prompt 'a large blue star' "
      "--output samples",
  ]
  return "\n".join(lines)
