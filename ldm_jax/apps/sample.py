"""What ``sample.py`` does: validate a request, sample in batches, write files."""

import dataclasses
import json
import logging
import math
import os

import numpy as np
from PIL import Image

from ldm_jax.data.image_io import make_grid, save_png
from ldm_jax.diffusion.config import parse_guidance_interval
from ldm_jax.diffusion.samplers import SAMPLERS
from ldm_jax.interop.load import load_pipeline

# Compute dtypes a model runs in (parameters stay float32).
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass
class SampleRequest:
  checkpoint: str
  prompts: list[str] = dataclasses.field(default_factory=list)
  prompts_file: str | None = None
  class_labels: list[int] = dataclasses.field(default_factory=list)
  negative_prompt: str = ""
  num: int = 1
  steps: int = 50
  sampler: str = "ddim"
  eta: float = 0.0
  guidance: float = 7.5
  guidance_interval: tuple | list | None = None  # (low, high) model timesteps; the command line's strings are parsed
  seed: int = 0
  height: int | None = None
  width: int | None = None
  init_image: str | None = None
  strength: float | None = None
  mask: str | None = None
  batch_size: int = 16
  dtype: str | None = None
  use_ema: bool = True
  output: str = "samples"

  def validate(self) -> None:
    """Checks what can be checked before loading the model; a ValueError names the flag and value."""
    if not os.path.exists(self.checkpoint):
      raise ValueError(f"--checkpoint {self.checkpoint!r} does not exist")
    if os.path.exists(self.output) and not os.path.isdir(self.output):
      raise ValueError(f"--output {self.output!r} is a file, not a directory")
    if not math.isfinite(self.guidance) or self.guidance < 0:
      raise ValueError(f"--guidance must be a finite number >= 0 (1: off), got {self.guidance}")
    if not 0.0 <= self.eta <= 1.0:  # also refuses nan
      raise ValueError(f"--eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {self.eta}")
    for flag, size in (("--height", self.height), ("--width", self.width)):
      if size is not None and size <= 0:
        raise ValueError(f"{flag} must be a positive number of pixels, got {size}")
    if self.dtype is not None and self.dtype not in COMPUTE_DTYPES:
      raise ValueError(f"unknown --dtype {self.dtype!r}; allowed: {', '.join(COMPUTE_DTYPES)}")
    if self.prompts_file:
      if not os.path.isfile(self.prompts_file):
        raise ValueError(f"--prompts_file {self.prompts_file!r} does not exist")
      with open(self.prompts_file) as f:
        self.prompts += [line.strip() for line in f if line.strip()]
      if not self.prompts:
        raise ValueError(f"--prompts_file {self.prompts_file!r} holds no prompts (one per line)")
    if self.prompts and self.class_labels:
      raise ValueError("give prompts or class labels, not both")
    if self.steps <= 0:
      raise ValueError(f"--steps must be a positive integer, got {self.steps}")
    if self.sampler not in SAMPLERS:
      raise ValueError(f"unknown --sampler {self.sampler!r}; allowed: {', '.join(sorted(SAMPLERS))}")
    if self.num <= 0 or self.batch_size <= 0:
      raise ValueError("--num and --batch_size must be positive")
    if self.guidance_interval is not None:
      self.guidance_interval = parse_guidance_interval(self.guidance_interval)
    if self.strength is not None and not 0.0 <= self.strength <= 1.0:  # also refuses nan
      raise ValueError(f"--strength must be in [0, 1], got {self.strength}")
    if (self.strength is not None or self.mask) and not self.init_image:
      raise ValueError("--strength and --mask need --init_image")
    sizes = {}
    for path, flag in ((self.init_image, "--init_image"), (self.mask, "--mask")):
      if path and not os.path.isfile(path):
        raise ValueError(f"{flag} {path!r} does not exist")
      if path:
        sizes[flag] = _image_size(path, flag)
    if len(sizes) == 2 and sizes["--mask"] != sizes["--init_image"]:
      (mw, mh), (iw, ih) = sizes["--mask"], sizes["--init_image"]
      raise ValueError(f"--mask is {mw}x{mh} but --init_image is {iw}x{ih}: they must be the same size")


def _image_size(path: str, flag: str) -> tuple[int, int]:
  """(width, height) of an image file, or a ValueError naming the flag."""
  try:
    with Image.open(path) as image:
      return image.size
  except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
    raise ValueError(f"{flag} {path!r} is not an image PIL can read ({e})") from None


def _read_image(path: str, size: tuple[int, int], mode: str) -> np.ndarray:
  image = Image.open(path).convert(mode)
  if image.size != (size[1], size[0]):
    image = image.resize((size[1], size[0]), Image.Resampling.LANCZOS)
  return np.asarray(image)


def run(request: SampleRequest) -> list[str]:
  """Samples every requested image; returns the written file paths."""
  from tqdm import tqdm


  try:
    pipeline = load_pipeline(request.checkpoint, use_ema=request.use_ema, compute_dtype=request.dtype)
  except (OSError, ValueError, KeyError) as e:  # missing, unreadable or mismatched files
    raise ValueError(f"cannot load --checkpoint {request.checkpoint!r}: {e}") from e
  model = pipeline.model
  height = request.height if request.height is not None else pipeline.image_size
  width = request.width if request.width is not None else pipeline.image_size
  f = model.downsample_factor
  if height % f or width % f:
    raise SystemExit(f"error: --height/--width {height}x{width} must be multiples of the latent factor {f}")
  if model.cond_key == "tokens" and not request.prompts:
    raise SystemExit("error: this model is text-conditional: give --prompt or --prompts_file")
  if model.cond_key == "label" and not request.class_labels:
    raise SystemExit("error: this model is class-conditional: give --class_label")
  conditions = request.prompts or request.class_labels or [None]
  jobs = [(c, k) for c in conditions for k in range(request.num)]
  init = mask = None
  if request.init_image:
    init = _read_image(request.init_image, (height, width), "RGB").astype(np.float32) / 127.5 - 1.0
  if request.mask:
    mask = (_read_image(request.mask, (height, width), "L") > 127).astype(np.float32)
  # with the checkpoint's scheduler settings
  sampler = pipeline.sampler_config(request.sampler, request.steps, guidance_interval=request.guidance_interval)
  os.makedirs(request.output, exist_ok=True)
  settings = {k: v for k, v in dataclasses.asdict(request).items() if k not in ("prompts", "class_labels", "output")}
  records, images = [], []
  for start in tqdm(range(0, len(jobs), request.batch_size), desc="sampling", unit="batch"):
    chunk = jobs[start:start + request.batch_size]
    kw = dict(sampler=sampler, guidance_scale=request.guidance, eta=request.eta, seed=request.seed,
              height=height, width=width, first_index=start)
    if init is not None:
      kw.update(init_images=np.repeat(init[None], len(chunk), 0), strength=request.strength)
    if mask is not None:
      kw["mask"] = np.repeat(mask[None], len(chunk), 0)
    if request.prompts:
      batch = pipeline.text_to_image([c for c, _ in chunk], negative_prompt=request.negative_prompt, **kw)
    elif request.class_labels:
      batch = pipeline.class_to_image([c for c, _ in chunk], **kw)
    else:
      batch = pipeline.generate({}, num=len(chunk), **kw)
    for i, ((condition, _), image) in enumerate(zip(chunk, batch)):
      index = start + i
      meta = {**settings, "index": index, "condition": condition}
      path = save_png(os.path.join(request.output, f"{index:05d}.png"), image, meta)
      records.append({"file": os.path.basename(path), **meta})
      images.append(image)
  grid = save_png(os.path.join(request.output, "grid.png"), make_grid(np.stack(images), ncols=request.num))
  with open(os.path.join(request.output, "samples.json"), "w") as fh:
    json.dump(records, fh, indent=2, default=str)
  logging.info("wrote %d images and %s", len(images), grid)
  print(f"Wrote {len(images)} images, {grid} and samples.json to {request.output}")
  return [os.path.join(request.output, r["file"]) for r in records]
