"""Sampling from a latent diffusion model: text/class/layout-to-image,
image-to-image, inpainting and super-resolution, sharded over a mesh.

One ``jax.jit`` program per static setting (model, sampler config, image size,
strength, whether guidance is used) runs conditioning, the whole sampler
``lax.scan`` and the decoder; seeds, guidance scales, prompts and weights
are traced arguments, so changing them never recompiles.
"""

import dataclasses
import functools
from collections.abc import Sequence
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
from ldm_jax.models.latent_diffusion import LatentDiffusion, nearest_downsample
from ldm_jax.parallel.distributed import compile_in_lockstep
from ldm_jax.parallel.mesh import batch_sharding, data_parallel_mesh, data_parallel_size


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
    key = "label"
    return self.generate({key: np.asarray(labels, np.int32)}, **kw)

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
      n = num or (len(init_images) if init_images is not None else 1)
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
    if self.model.concat_kind == "low_res":
      if low_res is None:
        raise ValueError("this is a super-resolution model: give the low-resolution images")
      host["low_res"] = np.asarray(low_res, np.float32)
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
    )
    static = dict(model=self.model, sampler_config=sampler, strength=strength, guided=guided,
                  blend=mask is not None and self.model.concat_kind != "inpaint")
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
@functools.partial(jax.jit, static_argnames=("model", "sampler_config", "strength", "guided", "blend"))
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
    *,
    model: LatentDiffusion,
    sampler_config: SamplerConfig,
    strength: float | None,
    guided: bool,
    blend: bool,
):
  """Conditioning → sampler scan → decoder, as one program."""
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
  )
  return model.decode_latents(frozen, z)
