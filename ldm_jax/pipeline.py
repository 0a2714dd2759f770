"""Sampling from a latent diffusion model: text/class/layout-to-image,
image-to-image, inpainting and super-resolution, sharded over a mesh.

One ``jax.jit`` program per static setting (model, sampler config, image size,
strength, whether guidance is used, the image-space guide) runs conditioning,
the whole sampler ``lax.scan`` and the decoder; seeds, guidance scales and
strengths, prompts, conditioning images and weights are traced arguments, so
changing them never recompiles.

Image-space guidance (``image_guide``): the sampler's ``guide_fn`` here
decodes the predicted latent x0 with the first stage (unclipped, so the
gradient reaches every pixel) and scores the image; the gradient flows back
through the decoder and the UNet to ``z_t`` (``ldm_jax.diffusion.image_guidance``).
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ldm_jax.data.image_io import to_uint8
from ldm_jax.data.tokenizers import tokenize
from ldm_jax.diffusion.config import SamplerConfig
from ldm_jax.diffusion.driver import sample as run_sampler
from ldm_jax.diffusion.schedules import DiffusionSchedule
from ldm_jax.models.first_stage import decode_latents
from ldm_jax.models.latent_diffusion import LatentDiffusion, nearest_downsample
from ldm_jax.parallel.distributed import compile_in_lockstep
from ldm_jax.parallel.mesh import batch_sharding, data_parallel_mesh, data_parallel_size

# image_guide(params, inputs, images_BxHxWx3) -> scalar: a log-likelihood of the decoded x0
# prediction (in [-1, 1], unclipped), summed over the batch. ``inputs`` are the per-example
# conditioning inputs (``low_res``, ``label``, any extra per-example array given to ``generate``),
# ``params`` the pytree passed as ``image_guide_params`` (e.g. a classifier's weights).
ImageGuide = Callable[[Any, dict[str, jax.Array], jax.Array], jax.Array]


def low_res_likelihood(params: Any, inputs: dict[str, jax.Array], images_BxHxWx3: jax.Array) -> jax.Array:
  """``log N(y; down(x), I)`` summed over pixels and the batch: the decoded x0 prediction ``x``,
  bicubically downsampled to the low-resolution input ``y`` (the degradation super-resolution
  models are trained on: ``LatentDiffusion.derive_inputs``), should give back ``y``."""
  del params
  low_res = inputs["low_res"].astype(jnp.float32)
  down = jax.image.resize(images_BxHxWx3, low_res.shape, "cubic")
  return -0.5 * jnp.sum(jnp.square(down - low_res))


IMAGE_GUIDES: dict[str, ImageGuide] = {"low_res": low_res_likelihood}


@dataclasses.dataclass(frozen=True)
class LatentImageGuide:
  """The sampler's ``guide_fn(guide_params, z0)``: decode, then score the image (hashable: static)."""

  model: LatentDiffusion
  image_guide: ImageGuide

  def __call__(self, guide_params: dict[str, Any], z0: jax.Array) -> jax.Array:
    first_stage = guide_params["frozen"]["first_stage"]
    images = decode_latents(self.model.first_stage, first_stage, z0 / self.model.scale_factor).astype(jnp.float32)
    return self.image_guide(guide_params["params"], guide_params["inputs"], images)


def concat_shrink(model: LatentDiffusion) -> float:
  """How much the concat stage resizes its map (``multiplier ** n_stages``) onto the latent grid."""
  rescaler = model.concat_stage.module if model.concat_stage is not None else None
  return rescaler.multiplier ** rescaler.n_stages if rescaler is not None else 1.0


def concat_map_size(model: LatentDiffusion, height: int, width: int) -> tuple[int, int]:
  """(h, w) a low-res image or segmentation map must have for an output of ``height x width``."""
  f, shrink = model.downsample_factor, concat_shrink(model)
  return round(height // f / shrink), round(width // f / shrink)


def describe_conditioning(model: LatentDiffusion) -> str:
  """What a model is conditioned on, in words (for error messages)."""
  parts = []
  if model.cond_key is not None:
    parts.append({"tokens": "text prompts", "label": "class labels", "layout_tokens": "layouts"}[model.cond_key])
  if model.use_label_emb:
    parts.append("class labels")
  parts.append({"none": "", "low_res": "a low-resolution image (super-resolution)",
                "inpaint": "a mask and a masked image (inpainting)",
                "segmentation": "a segmentation map"}[model.concat_kind])
  parts = [p for p in parts if p]
  return " and ".join(parts) if parts else "nothing (unconditional)"


@dataclasses.dataclass
class LDMPipeline:
  """A trained model ready to sample.

  Attributes:
    params: trained variables ``{"unet", ["cond"], ["concat"]}`` (EMA ones
      for sampling).
    frozen: ``{"first_stage", ["cond"]}``.
    tokenizer: for text prompts (``ldm_jax.data.tokenizers``), or None.
    prediction_type: what the UNet outputs (eps, x0 or v).
    mesh: devices to split the batch over (all local devices by default).
    sampler_defaults: ``SamplerConfig`` fields that go with the checkpoint's
      scheduler (timestep spacing, steps offset, ...), used by
      :meth:`sampler_config`.
  """

  model: LatentDiffusion
  params: Any
  frozen: Any
  schedule: DiffusionSchedule
  tokenizer: Any = None
  max_length: int = 77
  prediction_type: str = "eps"
  image_size: int = 256
  mesh: Mesh | None = None
  sampler_defaults: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.mesh is None:
      self.mesh = data_parallel_mesh()

  # ---------------------------------------------------------------- public
  def text_to_image(self, prompts: Sequence[str], *, negative_prompt: str | Sequence[str] = "", **kw) -> np.ndarray:
    """Images (uint8 NHWC) for text prompts, with classifier-free guidance."""

    if self.tokenizer is None:
      raise ValueError("this model has no tokenizer: it is not text-conditional")
    if not prompts:
      raise ValueError("the prompt list is empty: give at least one prompt")
    prompts = list(prompts)
    tokens, _ = tokenize(self.tokenizer, prompts, self.max_length)
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    neg_tokens, _ = tokenize(self.tokenizer, negatives, self.max_length)
    return self.generate({"tokens": tokens}, uncond_inputs={"tokens": neg_tokens}, **kw)

  def class_to_image(self, labels: Sequence[int], **kw) -> np.ndarray:
    """Images for class labels (cross-attention class encoder or the UNet's class embedding)."""
    return self.generate({"label": np.asarray(labels, np.int32)}, **kw)

  def layout_to_image(self, boxes_BxOx4: np.ndarray, labels_BxO: np.ndarray, num_objects_B: np.ndarray,
                      **kw) -> np.ndarray:
    """Images for object layouts: boxes ``(x0, y0, x1, y1)`` as fractions of the image, the first
    ``num_objects`` of each row used (layout-to-image models)."""
    if self.model.cond_key != "layout_tokens":
      raise ValueError(f"this model is conditioned on {describe_conditioning(self.model)}, not on layouts")
    boxes = np.asarray(boxes_BxOx4, np.float32)
    xywh = np.concatenate([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], axis=-1)
    tokens = self.model.cond_stage.module.tokenize(xywh, np.asarray(labels_BxO), np.asarray(num_objects_B))
    return self.generate({"layout_tokens": tokens}, **kw)

  def super_resolve(self, low_res: np.ndarray, **kw) -> np.ndarray:
    """Upsamples ``low_res`` (N, h, w, 3) in [-1, 1] by :attr:`upscale_factor` (super-resolution models)."""
    low_res = np.asarray(low_res, np.float32)
    factor = self.upscale_factor
    return self.generate({}, low_res=low_res, height=low_res.shape[1] * factor, width=low_res.shape[2] * factor,
                         **kw)

  @property
  def upscale_factor(self) -> int:
    """Output pixels per low-res pixel of a super-resolution model."""
    if self.model.concat_kind != "low_res":
      raise ValueError(f"this model is conditioned on {describe_conditioning(self.model)}, not on a low-res image")
    return round(self.model.downsample_factor * concat_shrink(self.model))

  def image_to_image(self, prompts: Sequence[str], init_images: np.ndarray, *, strength: float = 0.8,
                     **kw) -> np.ndarray:
    """Text-guided image-to-image: ``init_images`` (N, H, W, 3) in [-1, 1], noised to ``strength``."""
    init_images = np.asarray(init_images, np.float32)
    height, width = init_images.shape[1:3]
    return self.text_to_image(prompts, init_images=init_images, strength=strength, height=height, width=width, **kw)

  def inpaint(self, prompts: Sequence[str], init_images: np.ndarray, mask: np.ndarray, **kw) -> np.ndarray:
    """Repaints where ``mask`` (N, H, W) is 1, keeping the rest of ``init_images`` ([-1, 1])."""
    init_images = np.asarray(init_images, np.float32)
    height, width = init_images.shape[1:3]
    return self.text_to_image(prompts, init_images=init_images, mask=mask, height=height, width=width, **kw)

  def sampler_config(self, sampler: str = "ddim", num_steps: int = 50, **overrides: Any) -> SamplerConfig:
    """A ``SamplerConfig`` with this checkpoint's scheduler settings and prediction type."""
    fields = {"prediction_type": self.prediction_type, **self.sampler_defaults, **overrides}
    return SamplerConfig(sampler=sampler, num_steps=num_steps, **fields)

  def generate(
      self,
      inputs: dict[str, np.ndarray],
      *,
      num: int | None = None,
      uncond_inputs: dict[str, np.ndarray] | None = None,
      sampler: SamplerConfig | None = None,
      guidance_scale: float = 1.0,
      eta: float = 0.0,
      seed: int = 0,
      height: int | None = None,
      width: int | None = None,
      init_images: np.ndarray | None = None,
      strength: float | None = None,
      mask: np.ndarray | None = None,
      low_res: np.ndarray | None = None,
      segmentation: np.ndarray | None = None,
      image_guide: str | ImageGuide | None = None,
      image_guide_params: Any = None,
      image_guidance_strength: float = 0.0,
      first_index: int = 0,
      x_T: np.ndarray | None = None,
      output_type: str = "uint8",
  ) -> np.ndarray:
    """Samples one image per row of ``inputs`` (``num`` images for an
    unconditional model); returns uint8 NHWC on the host.

    ``mask`` (N, H, W) in pixels: 1 = repaint, 0 = keep (the usual image
    editor convention). Ordinary models blend the kept latent at every step;
    inpainting UNets (concat kind ``inpaint``) take mask and masked image as
    conditioning.

    Image ``i``'s starting noise comes from ``(seed, first_index + i)``, so
    with a deterministic sampler an image does not depend on how a run was
    split into batches. ``x_T`` (N, h, w, C latents) replaces that noise,
    e.g. to start from the same latents as another implementation.
    ``output_type="float"`` returns float32 images in [0, 1] instead of uint8.

    ``low_res`` (N, h, w, 3) in [-1, 1] (super-resolution) and
    ``segmentation`` (N, h, w) integer labels (semantic synthesis) must have
    the size the concat stage maps onto the latent grid of ``height x width``
    (:func:`concat_map_size`).

    ``image_guide`` (a name in ``IMAGE_GUIDES`` or an ``ImageGuide``, which
    must be hashable: it keys the compiled program) with
    ``image_guidance_strength`` s adds image-space guidance:
    ``eps_hat = eps - s sqrt(1 - alpha_bar_t) grad_{z_t} image_guide(D(z0(z_t)))``.
    """
    sampler = sampler or self.sampler_config()
    if output_type not in ("uint8", "float"):
      raise ValueError(f"output_type must be 'uint8' or 'float', got {output_type!r}")
    height, width = height or self.image_size, width or self.image_size
    f = self.model.downsample_factor
    if height % f or width % f:
      raise ValueError(f"height x width {height}x{width} must be multiples of the latent factor {f}")
    if inputs:
      n = len(jax.tree.leaves(inputs)[0])
    else:
      given = [a for a in (init_images, low_res, segmentation) if a is not None]
      n = num or (len(given[0]) if given else 1)
    if strength is not None and not 0.0 <= strength <= 1.0:
      raise ValueError(f"strength must be in [0, 1], got {strength}")
    if strength is not None and init_images is None:
      raise ValueError("strength needs init images (image-to-image)")
    host = dict(inputs)
    if mask is not None:
      mask = np.asarray(mask, np.float32)
      if init_images is None or mask.shape[:3] != np.shape(init_images)[:3]:
        raise ValueError(
            f"mask shape {mask.shape[:3]} must match the images' (N, H, W) "
            f"{None if init_images is None else np.shape(init_images)[:3]}"
        )
      if self.model.concat_kind == "inpaint":
        host["mask"] = mask[..., None]
        host["masked_image"] = np.asarray(init_images, np.float32) * (1.0 - mask[..., None])
    concat_size = concat_map_size(self.model, height, width)
    if self.model.concat_kind == "low_res":
      if low_res is None:
        raise ValueError("this is a super-resolution model: give the low-resolution images")
      low_res = np.asarray(low_res, np.float32)
      if low_res.ndim != 4 or low_res.shape[1:3] != concat_size or low_res.shape[0] != n:
        raise ValueError(f"low_res has shape {low_res.shape}; a {height}x{width} output needs ({n}, "
                         f"{concat_size[0]}, {concat_size[1]}, C) images")
      host["low_res"] = low_res
    elif low_res is not None:
      raise ValueError(f"low_res was given but this model is conditioned on {describe_conditioning(self.model)}")
    if self.model.concat_kind == "segmentation" and "segmentation_onehot" not in host:  # one-hot maps pass as given
      if segmentation is None:
        raise ValueError("this is a semantic synthesis model: give the segmentation maps")
      segmentation = np.asarray(segmentation)
      if segmentation.shape != (n, *concat_size):
        raise ValueError(f"segmentation has shape {segmentation.shape}; a {height}x{width} output needs "
                         f"({n}, {concat_size[0]}, {concat_size[1]}) label maps")
      if not np.issubdtype(segmentation.dtype, np.integer):
        raise ValueError(f"segmentation must hold integer labels, got {segmentation.dtype}")
      low, high = int(segmentation.min()), int(segmentation.max())
      if low < 0 or high >= self.model.num_seg_classes:
        raise ValueError(f"segmentation labels span [{low}, {high}]; this model has {self.model.num_seg_classes} "
                         f"classes (0..{self.model.num_seg_classes - 1})")
      host["segmentation"] = segmentation.astype(np.int32)
    elif segmentation is not None:
      raise ValueError(f"segmentation was given but this model is conditioned on {describe_conditioning(self.model)}")
    if isinstance(image_guide, str):
      if image_guide not in IMAGE_GUIDES:
        raise ValueError(f"unknown image_guide {image_guide!r}; choose from {sorted(IMAGE_GUIDES)} or pass a function")
      if image_guide == "low_res" and "low_res" not in host:
        raise ValueError("image_guide 'low_res' needs a super-resolution model and its low_res images")
      image_guide = IMAGE_GUIDES[image_guide]
    if not np.isfinite(image_guidance_strength) or image_guidance_strength < 0:
      raise ValueError(f"image_guidance_strength must be a finite number >= 0, got {image_guidance_strength}")
    guided = uncond_inputs is not None or self.model.cond_key is not None or self.model.use_label_emb
    if guided and uncond_inputs is None:
      uncond_inputs = jax.device_get(self.model.null_inputs(host))
    elif uncond_inputs is not None:
      uncond_inputs = {**host, **uncond_inputs}
    padded = _pad_rows(n, data_parallel_size(self.mesh))
    shard = batch_sharding(self.mesh)
    put = lambda tree: jax.tree.map(lambda a: _global(_pad(np.asarray(a), padded), shard), tree)  # noqa: E731
    rng = jax.random.key(seed)
    latent_shape = (height // f, width // f, self.model.latent_channels)
    if x_T is None:
      rows = [jax.random.normal(jax.random.fold_in(rng, first_index + i), latent_shape) for i in range(n)]
      x_T = np.stack([np.asarray(r) for r in rows])
    elif np.shape(x_T) != (n, *latent_shape):
      raise ValueError(f"x_T has shape {np.shape(x_T)}; expected {(n, *latent_shape)} (N, h, w, C latents)")
    x_T = _global(_pad(np.asarray(x_T, np.float32), padded), shard)
    k_sample = jax.random.fold_in(jax.random.split(rng)[1], first_index)  # stochastic samplers
    # Kept placed, so weights that arrived elsewhere cross the host once, not on every call.
    self.params, self.frozen = _on_mesh((self.params, self.frozen), self.mesh)
    args = (
        self.schedule, self.params, self.frozen, put(host), put(uncond_inputs) if guided else None, x_T, k_sample,
        jnp.float32(guidance_scale), jnp.float32(eta),
        put(np.asarray(init_images, np.float32)) if init_images is not None else None,
        put(mask[..., None]) if (mask is not None and self.model.concat_kind != "inpaint") else None,
        _on_mesh(image_guide_params, self.mesh), jnp.float32(image_guidance_strength),
    )
    static = dict(model=self.model, sampler_config=sampler, strength=strength, guided=guided,
                  blend=mask is not None and self.model.concat_kind != "inpaint",
                  guide=LatentImageGuide(self.model, image_guide) if image_guide is not None else None)
    compile_in_lockstep(_generate, *args, name="sample", **static)  # multi-process: start together
    images = _generate(*args, **static)
    images = multihost_utils.process_allgather(images, tiled=True)[:n]
    if output_type == "float":
      return (np.asarray(images, np.float32) + 1.0) / 2.0
    return to_uint8(images)


def _global(a: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from a host array every process holds in full (multi-host safe)."""
  return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])


def _on_mesh(tree: Any, mesh: Mesh) -> Any:
  """Weights laid out on the mesh's devices: arrays elsewhere (e.g. a first
  stage restored onto one device while training runs on several) are
  replicated; arrays already on the mesh keep their (e.g. FSDP) layout."""
  devices = set(mesh.devices.flat)
  replicated = NamedSharding(mesh, P())

  def place(a):
    if isinstance(a, jax.Array) and a.sharding.device_set != devices:
      return _global(np.asarray(a), replicated)
    return a

  return jax.tree.map(place, tree)


def _pad_rows(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _pad(a: np.ndarray, rows: int) -> np.ndarray:
  if a.shape[0] == rows:
    return a
  return np.concatenate([a, np.repeat(a[-1:], rows - a.shape[0], axis=0)], axis=0)


# One program shared by every pipeline: the model (a hashable frozen
# dataclass) is static and the schedule is traced, so pipelines loaded from
# equal configs reuse one compile instead of tracing their own.
@functools.partial(jax.jit, static_argnames=("model", "sampler_config", "strength", "guided", "blend", "guide"))
def _generate(
    schedule: DiffusionSchedule,
    params,
    frozen,
    inputs,
    uncond_inputs,
    x_T,
    rng,
    guidance_scale,
    eta,
    init_images,
    keep_mask,
    guide_params,
    guide_strength,
    *,
    model: LatentDiffusion,
    sampler_config: SamplerConfig,
    strength: float | None,
    guided: bool,
    blend: bool,
    guide: LatentImageGuide | None,
):
  """Conditioning → sampler scan → decoder, as one program."""
  if "segmentation" in inputs:  # one-hot here: the maps cross to devices as int32, not num_classes floats
    inputs, uncond_inputs = (_one_hot_segmentation(model, x) if x is not None else None
                             for x in (inputs, uncond_inputs))
  cond = model.encode_cond(params, frozen, inputs)
  uncond = model.encode_cond(params, frozen, uncond_inputs) if guided else None
  init_latent = model.encode_images(frozen, init_images) if init_images is not None else None
  latent_mask = None
  if blend:  # sampler convention: 1 keeps the known latent
    latent_mask = 1.0 - nearest_downsample(keep_mask, x_T.shape[1:3])
  z = run_sampler(
      model.apply, params, x_T, schedule, sampler_config, rng=rng, cond=cond, uncond=uncond,
      guidance_scale=guidance_scale, eta=eta, strength=strength, mask=latent_mask,
      # Inpainting UNets see the masked image through their concat input instead.
      init_latent=init_latent if (strength is not None or blend) else None,
      guide_fn=guide, guide_params={"frozen": frozen, "inputs": inputs, "params": guide_params} if guide else None,
      guidance_strength=guide_strength,
  )
  return model.decode_latents(frozen, z)


def _one_hot_segmentation(model: LatentDiffusion, inputs: dict[str, Any]) -> dict[str, Any]:
  out = dict(inputs)
  out["segmentation_onehot"] = jax.nn.one_hot(out.pop("segmentation"), model.num_seg_classes, dtype=jnp.float32)
  return out
