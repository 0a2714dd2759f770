"""What ``sample.py`` does: validate a request, sample in batches, write files.

Every conditioning task reads its condition from a file (``sample_inputs``
states the conventions): text prompts, class labels, a layout (JSON), a
segmentation map, a low-resolution image (super-resolution), an init image
with a mask (inpainting: latent blending for any model, the concat input of
inpainting models). Outputs may be larger than the training size
(convolutional sampling: the latent grid follows ``--height``/``--width``, or
the conditioning image's size).
"""

import dataclasses
import json
import logging
import math
import os

import numpy as np
from PIL import Image

from ldm_jax.apps import sample_inputs
from ldm_jax.data.image_io import make_grid, save_png
from ldm_jax.diffusion.config import parse_guidance_interval
from ldm_jax.diffusion.samplers import SAMPLERS
from ldm_jax.interop.load import load_pipeline
from ldm_jax.pipeline import IMAGE_GUIDES, LDMPipeline, concat_map_size, concat_shrink, describe_conditioning

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
  low_res: str | None = None
  segmentation: str | None = None
  layout: str | None = None
  image_guidance: str | None = None
  image_guidance_strength: float = 0.0
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
      if path:
        sizes[flag] = sample_inputs.image_size(path, flag)
    if len(sizes) == 2 and sizes["--mask"] != sizes["--init_image"]:
      (mw, mh), (iw, ih) = sizes["--mask"], sizes["--init_image"]
      raise ValueError(f"--mask is {mw}x{mh} but --init_image is {iw}x{ih}: they must be the same size")
    if self.image_guidance is not None and self.image_guidance not in IMAGE_GUIDES:
      raise ValueError(f"unknown --image_guidance {self.image_guidance!r}; allowed: {', '.join(sorted(IMAGE_GUIDES))}")
    if not math.isfinite(self.image_guidance_strength) or self.image_guidance_strength < 0:
      raise ValueError(f"--image_guidance_strength must be a finite number >= 0, got {self.image_guidance_strength}")
    if self.image_guidance_strength and self.image_guidance is None:
      raise ValueError("--image_guidance_strength needs --image_guidance (e.g. low_res)")
    if self.image_guidance == "low_res" and not self.low_res:
      raise ValueError("--image_guidance low_res needs --low_res (the image the output must downsample to)")
    read_conditions(self)  # every conditioning file is read once before the model is loaded


def read_conditions(request: SampleRequest) -> dict[str, np.ndarray]:
  """The conditioning files' contents: ``low_res``, ``segmentation``, ``boxes`` + ``layout_labels``."""
  out = {}
  if request.low_res:
    out["low_res"] = sample_inputs.read_rgb(request.low_res, "--low_res")
  if request.segmentation:
    out["segmentation"] = sample_inputs.read_label_map(request.segmentation)
  if request.layout:
    out["boxes"], out["layout_labels"] = sample_inputs.read_layout(request.layout)
  return out


def _read_image(path: str, size: tuple[int, int], mode: str) -> np.ndarray:
  image = Image.open(path).convert(mode)
  if image.size != (size[1], size[0]):
    image = image.resize((size[1], size[0]), Image.Resampling.LANCZOS)
  return np.asarray(image)


def check_fits_model(request: SampleRequest, pipeline: LDMPipeline, conditions: dict[str, np.ndarray]) -> None:
  """Refuses condition flags the model cannot use and asks for the ones it needs (ValueError)."""
  model = pipeline.model
  what = f"this model is conditioned on {describe_conditioning(model)}"
  takes_labels = model.cond_key == "label" or model.use_label_emb
  unusable = [
      ("--prompt/--prompts_file", request.prompts, model.cond_key == "tokens"),
      ("--class_label", request.class_labels, takes_labels),
      ("--low_res", request.low_res, model.concat_kind == "low_res"),
      ("--segmentation", request.segmentation, model.concat_kind == "segmentation"),
      ("--layout", request.layout, model.cond_key == "layout_tokens"),
  ]
  for flag, given, usable in unusable:
    if given and not usable:
      raise ValueError(f"{flag} does not apply: {what}")
  needed = [
      (model.cond_key == "tokens" and not request.prompts, "give --prompt or --prompts_file"),
      (takes_labels and not request.class_labels, "give --class_label"),
      (model.cond_key == "layout_tokens" and not request.layout, "give --layout LAYOUT.json"),
      (model.concat_kind == "low_res" and not request.low_res, "give --low_res IMAGE"),
      (model.concat_kind == "segmentation" and not request.segmentation, "give --segmentation LABELS.png"),
      (model.concat_kind == "inpaint" and not request.mask, "give --init_image IMAGE and --mask MASK"),
  ]
  for missing, hint in needed:
    if missing:
      raise ValueError(f"{what}: {hint}")
  if takes_labels:
    n = model.cond_stage.module.n_classes if model.cond_key == "label" else model.unet.num_classes
    bad = [c for c in request.class_labels if not 0 <= c < n]
    if bad:
      raise ValueError(f"--class_label {bad[0]} is out of range: this model has classes 0..{n - 1}")
  if "layout_labels" in conditions:
    encoder = model.cond_stage.module
    labels = conditions["layout_labels"]
    if len(labels) > encoder.max_objects:
      raise ValueError(f"--layout {request.layout!r} has {len(labels)} objects; this model takes at most "
                       f"{encoder.max_objects}")
    bad = [int(c) for c in labels if not 0 <= c < encoder.num_classes]
    if bad:
      raise ValueError(f"--layout {request.layout!r}: label {bad[0]} is out of range: this model has classes "
                       f"0..{encoder.num_classes - 1}")
  if "segmentation" in conditions:
    seg = conditions["segmentation"]
    if seg.min() < 0 or seg.max() >= model.num_seg_classes:
      raise ValueError(f"--segmentation {request.segmentation!r} holds labels {int(seg.min())}..{int(seg.max())}; "
                       f"this model has classes 0..{model.num_seg_classes - 1}")


def output_size(request: SampleRequest, pipeline: LDMPipeline, conditions: dict[str, np.ndarray]) -> tuple[int, int]:
  """(height, width) of the images: a conditioning map's size fixes it; otherwise the flags,
  the init image's size, or the training size."""
  model = pipeline.model
  f = model.downsample_factor
  for key, flag, path in (("low_res", "--low_res", request.low_res),
                          ("segmentation", "--segmentation", request.segmentation)):
    if key not in conditions:
      continue
    h, w = conditions[key].shape[:2]
    # The concat stage resizes the map by `shrink` onto the latent grid, which the decoder upsamples by f.
    scale = f * concat_shrink(model)
    height, width = round(h * scale), round(w * scale)
    if height % f or width % f or concat_map_size(model, height, width) != (h, w):
      raise ValueError(f"{flag} {path!r} is {w}x{h}: this model makes {scale:g}x its size, and its sides must "
                       f"then be multiples of the latent factor {f}; resize the file")
    if (request.height or height) != height or (request.width or width) != width:
      raise ValueError(f"{flag} {path!r} is {w}x{h}, so the output is {width}x{height}, but --height/--width ask "
                       f"for {request.width or width}x{request.height or height}")
    return height, width
  if request.init_image and request.height is None and request.width is None:
    width, height = sample_inputs.image_size(request.init_image, "--init_image")
    if height % f or width % f:
      raise ValueError(f"--init_image {request.init_image!r} is {width}x{height}: its sides must be multiples of the "
                       f"latent factor {f} (or give --height/--width to resize it)")
    return height, width
  height = request.height if request.height is not None else pipeline.image_size
  width = request.width if request.width is not None else pipeline.image_size
  if height % f or width % f:
    raise ValueError(f"--height/--width {height}x{width} must be multiples of the latent factor {f}")
  return height, width


def run(request: SampleRequest) -> list[str]:
  """Samples every requested image; returns the written file paths."""
  from tqdm import tqdm


  try:
    pipeline = load_pipeline(request.checkpoint, use_ema=request.use_ema, compute_dtype=request.dtype)
  except (OSError, ValueError, KeyError) as e:  # missing, unreadable or mismatched files
    raise ValueError(f"cannot load --checkpoint {request.checkpoint!r}: {e}") from e
  files = read_conditions(request)
  check_fits_model(request, pipeline, files)
  height, width = output_size(request, pipeline, files)
  conditions = request.prompts or request.class_labels or [None]
  jobs = [(c, k) for c in conditions for k in range(request.num)]
  init = mask = None
  if request.init_image:
    init = _read_image(request.init_image, (height, width), "RGB").astype(np.float32) / 127.5 - 1.0
  if request.mask:  # white (> 127) = hole
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
    for key in ("low_res", "segmentation"):
      if key in files:
        kw[key] = np.repeat(files[key][None], len(chunk), 0)
    if request.image_guidance:
      kw.update(image_guide=request.image_guidance, image_guidance_strength=request.image_guidance_strength)
    if request.prompts:
      batch = pipeline.text_to_image([c for c, _ in chunk], negative_prompt=request.negative_prompt, **kw)
    elif request.class_labels:
      batch = pipeline.class_to_image([c for c, _ in chunk], **kw)
    elif request.layout:
      boxes, labels = files["boxes"], files["layout_labels"]
      batch = pipeline.layout_to_image(np.repeat(boxes[None], len(chunk), 0), np.repeat(labels[None], len(chunk), 0),
                                       np.full(len(chunk), len(labels)), **kw)
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
