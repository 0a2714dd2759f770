"""The paper's compression study in miniature (Rombach et al. 2022, Sec. 4.1, Fig. 6): LDM-{1,2,4,8}.

  nice -n 10 python -m benchmarks.compression_study --workdir runs/compression
  python -m benchmarks.compression_study --workdir /tmp/cs --tiny --factors 1,2   # plumbing only

For each downsampling factor f it trains (or reuses, when its run folder is
there) a first stage on the built-in shapes dataset at 32 px, single-object
scenes: f = 1 is the identity (diffusion in pixel space), f = 2/4/8 a small
KL autoencoder with 1/2/3 downsamplings (``configs/autoencoder.py:demo``'s
recipe). Then a class-conditional LDM (``configs/ldm.py:shapes_class``'s UNet)
on its latents, with the Frechet distance of its EMA samples against the
validation images in the shapes judge's feature space every
``--eval_every`` steps (``config.eval``, ``feature_net="shapes_judge"``).

Matched as in the paper ("the same number of steps and the same number of
parameters"): one UNet (widths, levels, attention) for every f, the same
batch, optimiser and number of steps; only its input resolution (32 / f) and
its in/out channels (the latent's) differ. FLOPs per step therefore differ
(by about the latent area): they are measured per f from the lowered train
step (XLA's ``cost_analysis``), printed, stored, and the figure's right panel
plots FD against cumulative training FLOPs.

Everything goes under ``--workdir``: ``judge.safetensors``, ``f{F}/autoencoder``,
``f{F}/ldm``, ``compression_study.json`` and ``compression_study.png``.
"""

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time

import jax
import ml_collections
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ldm_jax.apps import train as train_app
from ldm_jax.apps.demo import parse_override
from ldm_jax.assembly import FirstStageWeights, build_model, example_inputs, schedule_from_config, step_config
from ldm_jax.config import load_config
from ldm_jax.data import make_iterator
from ldm_jax.data.image_io import to_uint8
from ldm_jax.evaluation import image_sources, shapes_judge, statistics
from ldm_jax.evaluation.feature_metrics import frechet_distance
from ldm_jax.interop.feature_nets import make_feature_net, save_judge
from ldm_jax.interop.load import first_stage_for
from ldm_jax.models.first_stage import decode_latents, encode_latents, make_first_stage
from ldm_jax.parallel.runtime import setup_runtime
from ldm_jax.training import ldm_step
from ldm_jax.training.optim import make_optimizer

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
RESULTS_FILE, FIGURE_FILE, JUDGE_FILE = "compression_study.json", "compression_study.png", "judge.safetensors"
# Autoencoder levels per factor: ch 16 times these (f = 2 ** (len - 1)), and latent channels as the
# paper's first stages (KL-f4: 3, KL-f8: 4).
CH_MULT = {2: (1, 2), 4: (1, 1, 2), 8: (1, 1, 2, 2)}
EMBED_DIM = {1: 3, 2: 3, 4: 3, 8: 4}


@dataclasses.dataclass(frozen=True)
class StudySettings:
  """What the study trains and measures (defaults: the committed run, about an hour on a 2-core CPU)."""

  factors: tuple[int, ...] = (1, 2, 4, 8)
  image_size: int = 32
  # Sized for an hour of a shared 2-core CPU (at about half a core: the machine runs other jobs).
  ae_steps: int = 400
  ldm_steps: int = 400
  batch_size: int = 16
  eval_every: int = 100
  eval_samples: int = 128  # > the judge's 64 features, so the covariance has full rank
  eval_sampler_steps: int = 20  # DDIM, unguided
  judge_steps: int = 400
  judge_per_pair: int = 60
  seed: int = 0
  tiny: bool = False
  ae_overrides: tuple[tuple[str, object], ...] = ()
  ldm_overrides: tuple[tuple[str, object], ...] = ()


def tiny_settings(factors: tuple[int, ...]) -> StudySettings:
  """Seconds per stage: checks the plumbing, the figures mean nothing."""
  return StudySettings(factors=factors, ae_steps=4, ldm_steps=4, batch_size=8, eval_every=2, eval_samples=8,
                       eval_sampler_steps=2, judge_steps=2, judge_per_pair=2, tiny=True)


def _override(config: ml_collections.ConfigDict, overrides) -> None:
  for key, value in overrides:
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise KeyError(f"unknown config key {key!r}")
    node[leaf] = value


def _shapes_data(config: ml_collections.ConfigDict, s: StudySettings) -> None:
  """The one dataset of the study: single-object scenes (the label names the image), 32 px."""
  config.data.update(source="shapes", image_size=s.image_size)
  config.data.shapes.max_objects = 1
  # Both stages read the same dataset folder (the split sizes name it): the tiny configs' sizes differ.
  sizes = (64, 16, 16) if s.tiny else (-1, -1, -1)
  config.data.shapes.update(num_train=sizes[0], num_validation=sizes[1], num_test=sizes[2])


def autoencoder_config(f: int, s: StudySettings) -> ml_collections.ConfigDict:
  """The demo autoencoder's recipe (L2, KL weight 1e-4, ch 16) with ``CH_MULT[f]`` at 32 px."""
  c = load_config(os.path.join(CONFIG_DIR, "autoencoder.py:demo" + (",tiny" if s.tiny else "")))
  _shapes_data(c, s)
  c.model.embed_dim = EMBED_DIM[f]
  c.model.ddconfig.update(ch_mult=CH_MULT[f], z_channels=EMBED_DIM[f], resolution=s.image_size)
  c.train.update(num_steps=s.ae_steps, crop_size=0, checkpoint_every=s.ae_steps, eval_every=s.ae_steps,
                 batch_size=s.batch_size, progress_bar=False)
  c.seed = s.seed
  _override(c, s.ae_overrides)
  return c


def ldm_config(f: int, s: StudySettings, workdir: str) -> ml_collections.ConfigDict:
  """``shapes_class``'s UNet on f's latents; only its resolution and in/out channels depend on f."""
  c = load_config(os.path.join(CONFIG_DIR, "ldm.py:shapes_class" + (",tiny" if s.tiny else "")))
  _shapes_data(c, s)
  if f == 1:
    c.first_stage.update(checkpoint="", random_init=True, scale_factor=-1.0,
                         model=ml_collections.ConfigDict(dict(kind="identity", embed_dim=3)))
  else:
    c.first_stage.update(checkpoint=os.path.join(workdir, f"f{f}", "autoencoder"), random_init=False,
                         scale_factor=-1.0)
  c.unet.update(image_size=s.image_size // f, in_channels=EMBED_DIM[f], out_channels=EMBED_DIM[f])
  c.ldm.cache_latents = True
  c.diffusion.cond_dropout = 0.0  # evaluated unguided
  c.train.update(batch_size=s.batch_size, num_steps=s.ldm_steps, checkpoint_every=s.ldm_steps, sample_every=0,
                 log_every=min(50, s.ldm_steps), progress_bar=False)
  c.eval.update(every=s.eval_every, num_samples=s.eval_samples, num_real=-1, batch_size=min(64, s.eval_samples),
                sampler="ddim", num_steps=s.eval_sampler_steps, guidance_scale=1.0, seed=s.seed,
                feature_net="shapes_judge", judge_weights=os.path.join(workdir, JUDGE_FILE))
  c.seed = s.seed
  _override(c, s.ldm_overrides)
  return c


def pixel_scale_factor(config: ml_collections.ConfigDict, num: int = 512) -> float:
  """1 / std of training pixels: the pixel-space "latent" at unit variance, as every KL latent is."""
  it = make_iterator(config.data, config.data.train_split, global_batch_size=num, seed=0, shuffle=False,
                     num_epochs=1, drop_remainder=False)
  return float(1.0 / np.std(next(iter(it))["image"]))


def train_step_cost(config: ml_collections.ConfigDict, first_stage: FirstStageWeights) -> dict:
  """FLOPs of one train step on cached latents (XLA's estimate of the lowered program) and UNet parameters."""
  model = build_model(config, first_stage.model_config, first_stage.scale_factor)
  cfg = step_config(config)
  tx, _ = make_optimizer(config.optim, config.train.num_steps, config.train.batch_size)
  side = config.data.image_size // model.downsample_factor
  b, c = config.train.batch_size, model.latent_channels
  init = ldm_step.make_init_fn(model, tx, cfg, example_inputs(model, config), first_stage.variables, (1, side, side, c))
  rng = jax.random.key(0, impl=config.get("prng_impl") or None)
  state = jax.eval_shape(init, rng)
  latent = jax.ShapeDtypeStruct((b, side, side, c), np.float32)
  batch = {"latent_mean": latent, "label": jax.ShapeDtypeStruct((b,), np.int32)}
  if first_stage.model_config["kind"] == "kl":
    batch["latent_logvar"] = latent
  step = ldm_step.make_train_step(model, schedule_from_config(config.diffusion), tx, cfg)
  frozen = {"first_stage": first_stage.variables}
  cost = jax.jit(step).lower(state, batch, rng, frozen).cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params["unet"]))
  return {"flops_per_step": float(cost["flops"]), "unet_params": params, "latent_shape": [side, side, c]}


def first_stage_floor(config: ml_collections.ConfigDict, first_stage: FirstStageWeights, judge_path: str) -> float:
  """FD of the validation images after the first stage's round trip (posterior mean, through uint8 as
  samples are) against the images themselves: about the lowest FD stage 2 can reach through that decoder."""
  extract = make_feature_net("shapes_judge", judge_weights=judge_path).extractor()
  model = make_first_stage(first_stage.model_config)
  round_trip = jax.jit(lambda v, x: decode_latents(model, v, encode_latents(model, v, x)))
  real, decoded = [], []
  for batch in image_sources.split_batches(config.data, config.data.eval_split, batch_size=64):
    real.append(extract(batch["image"])["pool"])
    decoded.append(extract(to_uint8(np.asarray(round_trip(first_stage.variables, batch["image"]))))["pool"])
  stats = [statistics.mean_and_covariance(np.concatenate(x)) for x in (decoded, real)]
  return max(0.0, float(frechet_distance(*stats[0], *stats[1])))  # rounding can give -1e-8


def _finished(run_dir: str, steps: int) -> bool:
  return os.path.isdir(os.path.join(run_dir, "checkpoints", str(steps)))


def _read_metrics(run_dir: str) -> list[dict]:
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _judge(workdir: str, s: StudySettings) -> dict:
  """Trains the shapes judge at the study's size once; its accuracy on fresh renders."""
  path, info_path = os.path.join(workdir, JUDGE_FILE), os.path.join(workdir, "judge.json")
  if os.path.isfile(path) and os.path.isfile(info_path):
    with open(info_path) as f:
      return json.load(f)
  start = time.perf_counter()
  judge = shapes_judge.train_judge(s.image_size, steps=s.judge_steps, per_pair=s.judge_per_pair, seed=s.seed)
  save_judge(path, judge.params)
  info = {"steps": s.judge_steps, "renders_per_pair": s.judge_per_pair,
          "heldout_colour_accuracy": judge.heldout_colour_accuracy,
          "heldout_shape_accuracy": judge.heldout_shape_accuracy, "train_s": round(time.perf_counter() - start, 1)}
  with open(info_path, "w") as f:
    json.dump(info, f, indent=2)
  return info


def run_factor(f: int, workdir: str, s: StudySettings, previous: dict | None = None) -> dict:
  """First stage, then stage 2 with periodic FD, for one factor; its row of the report.

  A stage already trained in ``workdir`` is reused; its time is then the one ``previous`` (the
  last report's row) measured, marked ``"reused": true``.
  """
  out: dict = {"f": f}
  fdir = os.path.join(workdir, f"f{f}")
  previous = previous or {}
  if f == 1:
    out["first_stage"] = {"kind": "identity", "embed_dim": EMBED_DIM[f]}
  else:
    ae = autoencoder_config(f, s)
    reused = _finished(os.path.join(fdir, "autoencoder"), s.ae_steps)
    start = time.perf_counter()
    result = train_app.train_first_stage(ae, os.path.join(fdir, "autoencoder"))
    out["first_stage"] = {
        "kind": "kl", "ch_mult": list(CH_MULT[f]), "embed_dim": EMBED_DIM[f], "ch": ae.model.ddconfig.ch,
        "steps": result.step, "val_psnr_db": result.eval_metrics.get("val/psnr"),
        "scale_factor": result.scale_factor, "train_s": round(time.perf_counter() - start, 1)}
    if reused and "train_s" in previous.get("first_stage", {}):
      out["first_stage"].update(train_s=previous["first_stage"]["train_s"], reused=True)
  config = ldm_config(f, s, workdir)
  if f == 1:
    config.first_stage.scale_factor = pixel_scale_factor(config)
    out["first_stage"]["scale_factor"] = config.first_stage.scale_factor
  first_stage = first_stage_for(config)
  out["first_stage"]["floor_fd"] = first_stage_floor(config, first_stage, os.path.join(workdir, JUDGE_FILE))
  out["cost"] = train_step_cost(config, first_stage)
  print(f"f={f}: latents {out['cost']['latent_shape']}, UNet {out['cost']['unet_params'] / 1e6:.3f}M params, "
        f"{out['cost']['flops_per_step'] / 1e9:.2f} GFLOP per train step of {s.batch_size}", flush=True)
  run_dir = os.path.join(fdir, "ldm")
  reused = _finished(run_dir, s.ldm_steps)
  start = time.perf_counter()
  result = train_app.train_latent_diffusion(config, run_dir)
  metrics = _read_metrics(run_dir)
  out["ldm"] = {
      "steps": result.step, "train_s": round(time.perf_counter() - start, 1),
      "final_loss": float(result.last_metrics.get("loss", float("nan"))),
      # One point per step (the loop echoes a hook's metrics into the log as well).
      "fd": sorted({m["step"]: m["eval/fid"] for m in metrics if "eval/fid" in m}.items()),
      "images_per_sec": [m["images_per_sec"] for m in metrics if "images_per_sec" in m][-1:] or None,
  }
  if reused and "train_s" in previous.get("ldm", {}):
    out["ldm"].update(train_s=previous["ldm"]["train_s"], reused=True)
  return out


def run_study(workdir: str, s: StudySettings) -> dict:
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  start = time.perf_counter()
  previous = {}
  if os.path.isfile(os.path.join(workdir, RESULTS_FILE)):
    with open(os.path.join(workdir, RESULTS_FILE)) as f:
      old = json.load(f)
    previous = {r["f"]: r for r in old["runs"]}
  report = {"settings": dataclasses.asdict(s), "judge": _judge(workdir, s), "runs": []}
  for f in s.factors:
    print(f"\n=== LDM-{f} ===", flush=True)
    report["runs"].append(run_factor(f, workdir, s, previous.get(f)))
  report["wall_s"] = round(time.perf_counter() - start, 1)
  if previous:  # this call's wall time, not the training's: rows marked "reused" were measured before
    report["previous_wall_s"] = old.get("wall_s")
  report["machine"] = {"devices": [str(d) for d in jax.devices()], "cpus": os.cpu_count(),
                       "python": platform.python_version(), "jax": jax.__version__,
                       "command": "python -m benchmarks.compression_study " + " ".join(sys.argv[1:])}
  with open(os.path.join(workdir, RESULTS_FILE), "w") as f:
    json.dump(report, f, indent=2)
  plot(report, os.path.join(workdir, FIGURE_FILE))
  print(summary(report), flush=True)
  return report


def summary(report: dict) -> str:
  lines = ["", "f  latent     GFLOP/step  floor  FD by step"]
  for r in report["runs"]:
    fd = ", ".join(f"{step}: {v:.1f}" for step, v in r["ldm"]["fd"])
    shape = "x".join(str(v) for v in r["cost"]["latent_shape"])
    floor = r["first_stage"]["floor_fd"]
    lines.append(f"{r['f']:<2} {shape:<10} {r['cost']['flops_per_step'] / 1e9:>10.2f}  {floor:5.1f}  {fd}")
  return "\n".join(lines)


# ---------------------------------------------------------------- the figure (PIL: no matplotlib here)
COLOURS = {1: (214, 39, 40), 2: (255, 127, 14), 4: (44, 160, 44), 8: (31, 119, 180), 16: (148, 103, 189),
           32: (140, 86, 75)}


def _font(size: int):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1 has one size
    return ImageFont.load_default()


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
  step = 10 ** math.floor(math.log10(max(hi - lo, 1e-12) / n))
  step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= n)
  first = math.ceil(lo / step) * step
  return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _panel(draw, box, series: dict, xlabel: str, log_x: bool, font) -> None:
  """One line chart in ``box`` = (left, top, right, bottom) of ``{f: [(x, y), ...]}``."""
  left, top, right, bottom = box
  points = [p for pts in series.values() for p in pts]
  xs = [math.log10(x) if log_x else x for x, _ in points]
  ys = [y for _, y in points]
  x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
  if log_x:
    x0, x1 = math.floor(x0), math.ceil(x1)
  else:
    x0 = 0.0
  y0, y1 = 0.0, (max(ys) * 1.05 if ys else 1.0)
  x1, y1 = (x1 if x1 > x0 else x0 + 1.0), (y1 if y1 > y0 else y0 + 1.0)
  px = lambda x: left + (((math.log10(x) if log_x else x) - x0) / (x1 - x0)) * (right - left)  # noqa: E731
  py = lambda y: bottom - (y - y0) / (y1 - y0) * (bottom - top)  # noqa: E731
  draw.rectangle(box, outline=(0, 0, 0))
  for t in _nice_ticks(y0, y1):
    draw.line([(left, py(t)), (right, py(t))], fill=(225, 225, 225))
    draw.text((left - 6, py(t)), f"{t:g}", fill=(0, 0, 0), font=font, anchor="rm")
  xticks = [10.0 ** e for e in range(int(x0), int(x1) + 1)] if log_x else _nice_ticks(x0, x1)
  for t in xticks:
    draw.line([(px(t), bottom), (px(t), bottom + 4)], fill=(0, 0, 0))
    label = f"1e{round(math.log10(t))}" if log_x else f"{t:g}"
    draw.text((px(t), bottom + 6), label, fill=(0, 0, 0), font=font, anchor="mt")
  draw.text(((left + right) / 2, bottom + 26), xlabel, fill=(0, 0, 0), font=font, anchor="mt")
  for f, pts in series.items():
    xy = [(px(x), py(y)) for x, y in pts]
    if len(xy) > 1:
      draw.line(xy, fill=COLOURS.get(f, (0, 0, 0)), width=3)
    for x, y in xy:
      draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=COLOURS.get(f, (0, 0, 0)))


def plot(report: dict, path: str) -> None:
  """FD against training steps (left) and against cumulative training FLOPs (right), one line per f."""
  width, height = 1200, 520
  image = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(image)
  font, big = _font(14), _font(18)
  by_steps = {r["f"]: [(s, v) for s, v in r["ldm"]["fd"]] for r in report["runs"]}
  by_flops = {r["f"]: [(s * r["cost"]["flops_per_step"], v) for s, v in r["ldm"]["fd"] if s > 0]
              for r in report["runs"]}
  s = report["settings"]
  draw.text((width / 2, 14), f"Shapes 32 px, class-conditional LDM-f: Frechet distance (shapes judge) of "
            f"{s['eval_samples']} unguided DDIM-{s['eval_sampler_steps']} samples", fill=(0, 0, 0), font=big,
            anchor="mt")
  _panel(draw, (80, 60, 570, 440), by_steps, "training steps (batch %d)" % s["batch_size"], False, font)
  _panel(draw, (680, 60, 1170, 440), by_flops, "training FLOPs (XLA cost analysis)", True, font)
  draw.text((20, 250), "FD", fill=(0, 0, 0), font=big, anchor="lm")
  x = 40
  for r in report["runs"]:
    f = r["f"]
    draw.line([(x, 490), (x + 30, 490)], fill=COLOURS.get(f, (0, 0, 0)), width=3)
    name = "pixels" if f == 1 else "KL-f%d" % f
    draw.text((x + 38, 490), f"LDM-{f} ({name}, latent {'x'.join(map(str, r['cost']['latent_shape']))})",
              fill=(0, 0, 0), font=font, anchor="lm")
    x += 290
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  image.save(path, optimize=True)


def parse_args(argv: list[str]) -> tuple[str, StudySettings]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", default="runs/compression_study")
  p.add_argument("--factors", default="1,2,4,8", help="comma-separated downsampling factors (1, 2, 4, 8)")
  p.add_argument("--tiny", action="store_true", help="seconds-long stages to check the plumbing")
  d = StudySettings()
  for name in ("ae_steps", "ldm_steps", "batch_size", "eval_every", "eval_samples", "eval_sampler_steps",
               "judge_steps", "judge_per_pair", "seed"):
    p.add_argument("--" + name, type=int, default=None, help=f"default {getattr(d, name)}")
  p.add_argument("--ae", action="append", default=[], help="KEY=VALUE override of every stage-1 config")
  p.add_argument("--ldm", action="append", default=[], help="KEY=VALUE override of every stage-2 config")
  a = p.parse_args(argv)
  factors = tuple(int(v) for v in a.factors.split(",") if v)
  bad = [f for f in factors if f != 1 and f not in CH_MULT]
  if bad or not factors:
    p.error(f"--factors: each must be one of {(1, *CH_MULT)}, got {a.factors!r}")
  s = tiny_settings(factors) if a.tiny else StudySettings(factors=factors)
  given = {k: v for k, v in vars(a).items() if k in {fl.name for fl in dataclasses.fields(s)} and v is not None}
  given.pop("factors", None)
  given.pop("tiny", None)
  s = dataclasses.replace(s, **given, ae_overrides=tuple(parse_override(o) for o in a.ae),
                          ldm_overrides=tuple(parse_override(o) for o in a.ldm))
  return a.workdir, s


def main(argv: list[str] | None = None) -> None:
  workdir, settings = parse_args(sys.argv[1:] if argv is None else argv)
  setup_runtime(compilation_cache_dir="" if settings.tiny else "~/.cache/ldm_jax/xla", cpu_devices=2)
  run_study(workdir, settings)


if __name__ == "__main__":
  main()
