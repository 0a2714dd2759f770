"""``precompute_latents.py``: encode a stage-2 config's images once, write latent shards.

Stage 2 trained from images decodes every JPEG and runs the frozen encoder on
every step; on accelerators that is where the time goes. This reads the
config's data (any source, one center-cropped unflipped view per image),
encodes it with the config's first stage (``first_stage_for``), jitted and
split over this process's devices, and writes ``ldm_jax.latents.v1`` shards
(``ldm_jax.data.latent_records``) per split, then their metadata. Training
reads them with ``--config.data.source=latents --config.data.path=OUT``.

Restartable: a shard is written under a temporary name and renamed when
complete, so a rerun of the same command keeps finished shards and writes
the rest. With several processes, process p writes shards p, p + P, ...
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Iterator

import grain
import jax
import ml_collections
import numpy as np
from absl import flags
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ldm_jax.assembly import FirstStageWeights, build_model
from ldm_jax.data import latent_records as lr
from ldm_jax.data.pipeline import (
  check_latents_config,
  conditional_transforms,
  conditioning_config,
  open_conditional_source,
)
from ldm_jax.data.preprocess import Preprocess
from ldm_jax.data.skipping import ERROR_KEY, MISSING_CAPTION_KEY, SafeRead
from ldm_jax.data.tokenizers import load_tokenizer, tokenize
from ldm_jax.data.transforms import Geometry, to_unit_range
from ldm_jax.interop.load import first_stage_for, frozen_cond_variables
from ldm_jax.models.autoencoder import DiagonalGaussian
from ldm_jax.training.latent_records_check import encoder_identity, first_stage_identity, weights_digest

# Fields of a preprocessed example that are not stored: made from pixels, or the pixels themselves.
_NOT_STORED = ("image", "segmentation", "low_res", "mask", "caption", MISSING_CAPTION_KEY)
# Settings of the metadata that must agree for a rerun to go on writing into the same folder.
_PLAN_KEYS = ("num_shards", "source_records", "image_size", "latent_shape", "dtype", "has_logvar", "first_stage",
              "context", "tokenizer")


@dataclasses.dataclass
class PrecomputeResult:
  """Per split: the shards written now and those kept from an earlier run, records, images per second."""

  written: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  kept: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  num_records: dict[str, int] = dataclasses.field(default_factory=dict)
  images_per_second: dict[str, float] = dataclasses.field(default_factory=dict)


class _ReadExample:
  """Source index -> preprocessed example plus its raw caption(s) and path (picklable, for grain workers)."""

  def __init__(self, source, preprocess: Preprocess, split: str):
    self.source, self.preprocess, self.split = SafeRead(source), preprocess, split

  def __call__(self, index: int, rng: np.random.Generator) -> dict:
    raw = self.source[int(index)]
    out = self.preprocess(raw, rng)
    if ERROR_KEY in out:
      return out
    out["path"] = str(raw.get("path") or f"{self.split}[{int(index)}]")
    if "caption" in raw:  # every caption of a multi-caption image; training picks one per step
      caption = raw["caption"]
      out["caption"] = [str(c) for c in caption] if isinstance(caption, (list, tuple)) else out["caption"]
    return out


def check_precompute_config(config: ml_collections.ConfigDict, dtype: str, num_shards: int) -> None:
  """Refuses settings under which one stored view of each image would be wrong."""
  if config.get("stage") != "ldm":
    raise ValueError(f"precompute_latents needs a stage-2 config (configs/ldm.py), got stage {config.get('stage')!r}")
  if config.data.source == "latents":
    raise ValueError("config.data.source is already 'latents': point the config at the images to encode")
  if dtype not in lr.LATENT_DTYPES:
    raise ValueError(f"--dtype must be one of {lr.LATENT_DTYPES}, got {dtype!r}")
  if num_shards < 1:
    raise ValueError(f"--num_shards must be at least 1, got {num_shards}")
  try:
    check_latents_config(config.data, conditioning_config(config.data))
  except ValueError as e:
    raise ValueError(f"precompute_latents writes one fixed view per image: {e}") from None


def _first_stage(config: ml_collections.ConfigDict) -> tuple[FirstStageWeights, str]:
  """The config's first stage and its name; a fine-tuning config's is its pretrained model's."""
  if not config.first_stage.checkpoint and config.get("pretrained") is not None and config.pretrained.path:
    config = ml_collections.ConfigDict(config.to_dict())
    config.first_stage.update(checkpoint=config.pretrained.path, random_init=False)
  name = config.first_stage.checkpoint or ("random_init" if config.first_stage.get("random_init") else "")
  return first_stage_for(config), name


def _local_batches(elements: Iterator[dict], batch_size: int, counts: dict) -> Iterator[list[dict]]:
  batch = []
  for example in elements:
    if ERROR_KEY in example:
      counts["skipped"] += 1
      print(f"skipped: {example[ERROR_KEY]}", flush=True)
      continue
    batch.append(example)
    if len(batch) == batch_size:
      yield batch
      batch = []
  if batch:
    yield batch


@functools.cache  # one compiled program per first stage module, however many splits and reruns
def _jitted_moments(fs):
  def moments(variables, images):
    out = fs.apply(variables, images, method=fs.encode)
    if isinstance(out, DiagonalGaussian):
      return {"latent_mean": out.mean, "latent_logvar": out.logvar}
    return {"latent_mean": out}  # a VQ's pre-quantisation latent

  return jax.jit(moments)


@functools.cache
def _jitted_context(cond_stage):
  return jax.jit(cond_stage.encode)


class _Encoder:
  """Jitted first stage (and text encoder) over this process's devices; pads the last batch."""

  def __init__(self, model, first_stage: FirstStageWeights, cond_variables, dtype: str, batch_size: int):
    devices = jax.local_devices()
    self.mesh = Mesh(np.asarray(devices), ("data",))
    self.batch = -(-batch_size // len(devices)) * len(devices)
    self.dtype = np.dtype(dtype)
    replicate = NamedSharding(self.mesh, P())
    self.split = NamedSharding(self.mesh, P("data"))
    self.fs_variables = jax.device_put(first_stage.variables, replicate)
    self.cond_variables = None if cond_variables is None else jax.device_put(cond_variables, replicate)
    self._moments = _jitted_moments(model.first_stage)
    self._context = _jitted_context(model.cond_stage) if cond_variables is not None else None

  def _run(self, fn, variables, x: np.ndarray) -> dict:
    n = len(x)
    padded = np.concatenate([x, np.repeat(x[-1:], self.batch - n, axis=0)]) if n < self.batch else x
    out = jax.device_get(fn(variables, jax.device_put(padded, self.split)))
    return jax.tree.map(lambda a: np.asarray(a[:n], self.dtype), out)

  def latents(self, images: np.ndarray) -> dict:
    return self._run(self._moments, self.fs_variables, images)

  def context(self, tokens: np.ndarray) -> np.ndarray:
    return self._run(self._context, self.cond_variables, tokens)


def _records(batches: Iterator[list[dict]], encoder: _Encoder, tokenizer, max_length: int,
             with_context: bool) -> Iterator[bytes]:
  for batch in batches:
    encoded = encoder.latents(to_unit_range(np.stack([e["image"] for e in batch])))
    extra = {}
    captions = [e.get("caption") for e in batch]
    single = all(isinstance(c, str) for c in captions)
    if tokenizer is not None and single:
      extra["tokens"], extra["attention_mask"] = tokenize(tokenizer, captions, max_length)
    if with_context:
      if not single:
        several = next(e for e in batch if not isinstance(e.get("caption"), str))
        raise ValueError(f"--with_context stores one context per image, but {several['path']} has "
                         f"{len(several.get('caption') or [])} captions; precompute without --with_context")
      extra["context"] = encoder.context(extra["tokens"])
    for i, example in enumerate(batch):
      fields = {k: v[i] for k, v in {**encoded, **extra}.items()}
      fields.update({k: v for k, v in example.items() if k not in _NOT_STORED})
      if "caption" in example:
        fields["caption"] = example["caption"]
      yield lr.encode_record(fields)


def _tokenizer_identity(config: ml_collections.ConfigDict, tokenizer) -> dict | None:
  if tokenizer is None:
    return None
  t = config.data.tokenizer
  vocab = sorted(tokenizer.get_vocab().items())
  return {"kind": t.kind, "path": t.path, "max_length": t.max_length,
          "digest": weights_digest({"vocab": np.frombuffer(repr(vocab).encode(), np.uint8)})}


def precompute(config: ml_collections.ConfigDict, out: str, *, num_shards: int = 1, dtype: str = "float16",
               with_context: bool = False, splits: tuple[str, ...] = (), batch_size: int = 0) -> PrecomputeResult:
  """Writes the latents of ``splits`` (default: the train split) of ``config``'s data into ``out``."""
  check_precompute_config(config, dtype, num_shards)
  first_stage, fs_name = _first_stage(config)
  scale = config.first_stage.scale_factor if config.first_stage.scale_factor > 0 else first_stage.scale_factor
  tokenizer = load_tokenizer(config.data.tokenizer)
  model = build_model(config, first_stage.model_config, scale, tokenizer)
  if model.concat_kind in ("low_res", "inpaint", "segmentation"):
    raise ValueError(f"concat.kind {model.concat_kind!r} conditions on the images themselves: train it from the "
                     "images, not from precomputed latents")
  cond_variables, context = None, None
  if with_context:
    if model.cond_key != "tokens" or model.cond_stage.trainable:
      what = "trained with the UNet" if model.cond_key == "tokens" else "no text encoder"
      raise ValueError(f"--with_context stores a frozen text encoder's output, but cond_stage.kind "
                       f"{config.cond_stage.kind!r} is {what}")
    cond_variables = frozen_cond_variables(model, config)
    ctx_shape = jax.eval_shape(model.cond_stage.encode, cond_variables,
                               np.zeros((1, config.data.tokenizer.max_length), np.int32)).shape[1:]
    context = {"shape": list(ctx_shape), "encoder": encoder_identity(
        config.cond_stage.to_dict(), cond_variables, config.cond_stage.get("checkpoint") or "")}
  size = config.data.image_size
  encoder = _Encoder(model, first_stage, cond_variables, dtype, batch_size or config.train.batch_size)
  probe = jax.eval_shape(encoder._moments, first_stage.variables, np.zeros((1, size, size, 3), np.float32))
  plan_common = {
      "image_size": size, "latent_shape": list(probe["latent_mean"].shape[1:]), "dtype": dtype,
      "has_logvar": "latent_logvar" in probe, "first_stage": first_stage_identity(first_stage, scale, fs_name),
      "context": context, "tokenizer": _tokenizer_identity(config, tokenizer),
  }
  conditioning = conditioning_config(config.data)
  preprocess = Preprocess(Geometry(size, "center", False), config.data.get("missing_caption", "empty"),
                          **conditional_transforms(conditioning, size))
  os.makedirs(out, exist_ok=True)
  result = PrecomputeResult()
  for split in splits or (config.data.train_split,):
    source = open_conditional_source(config.data, split, conditioning)
    ranges = lr.shard_ranges(len(source), num_shards)
    plan = {"split": split, "num_shards": len(ranges), "source_records": len(source), **plan_common,
            "data": {k: config.data.get(k) for k in ("source", "name", "path", "data_dir")}}
    _start_split(out, split, plan)
    mine = range(jax.process_index(), len(ranges), jax.process_count())
    written, kept, counts, images, seconds = [], [], {"skipped": 0}, 0, 0.0
    for k in mine:
      path = os.path.join(out, lr.shard_name(split, k, len(ranges)))
      if os.path.exists(path):
        kept.append(path)
        print(f"{split}: shard {k + 1}/{len(ranges)} already written, kept: {path}", flush=True)
        continue
      start, stop = ranges[k]
      elements = (grain.MapDataset.range(start, stop).random_map(_ReadExample(source, preprocess, split),
                                                                  seed=config.seed)
                  .to_iter_dataset(grain.ReadOptions(num_threads=config.data.num_threads)))
      if config.data.num_workers > 0:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags
          flags.FLAGS.mark_as_parsed()
        elements = elements.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers))
      t0 = time.perf_counter()
      batches = _local_batches(iter(elements), encoder.batch, counts)
      n = lr.write_shard(path, _records(batches, encoder, tokenizer, config.data.tokenizer.max_length, with_context))
      dt = time.perf_counter() - t0
      images, seconds = images + n, seconds + dt
      written.append(path)
      print(f"{split}: shard {k + 1}/{len(ranges)}: {n} latents in {dt:.1f} s ({n / max(dt, 1e-9):.1f} images/s)",
            flush=True)
    result.written[split], result.kept[split] = written, kept
    result.images_per_second[split] = images / seconds if seconds else 0.0
    result.num_records[split] = _finish_split(out, split, plan)
    if images:
      print(f"{split}: {images} images encoded in {seconds:.1f} s: {images / seconds:.1f} images/s on "
            f"{len(encoder.mesh.devices.flat)} device(s); {counts['skipped']} unreadable skipped", flush=True)
  return result


def _start_split(out: str, split: str, plan: dict) -> None:
  """Writes the split's unfinished metadata, or checks that a rerun asks for what the first run did."""
  path = lr.metadata_path(out, split)
  if os.path.exists(path):
    existing = lr.read_metadata_file(path)
    differs = [k for k in _PLAN_KEYS if _comparable(existing.get(k)) != _comparable(lr.json_view(plan[k]))]
    if differs:
      raise ValueError(f"{path} was written with other settings (they differ in {', '.join(differs)}): write these "
                       f"latents to a new --out, or delete the folder's {split}.latents.* files")
    if existing.get("complete"):
      return
  lr.write_metadata(out, split, {**plan, "complete": False})


def _comparable(value):
  """A plan entry without the names of the first stage / encoder: the same weights moved elsewhere still match."""
  if isinstance(value, dict):
    return {k: _comparable(v) for k, v in value.items() if k != "name"}
  return value


def _finish_split(out: str, split: str, plan: dict) -> int:
  """Once every shard exists (any process may get there): count records, write complete metadata."""
  shards = [os.path.join(out, lr.shard_name(split, k, plan["num_shards"])) for k in range(plan["num_shards"])]
  if not all(os.path.exists(s) for s in shards):
    return 0
  counts = [lr.count_records(s) for s in shards]
  first = next((s for s, c in zip(shards, counts) if c), None)
  fields = sorted(lr.LatentRecordSource([first])[0]) if first else []
  lr.write_metadata(out, split, {**plan, "complete": True, "num_records": sum(counts), "fields": fields})
  return sum(counts)
