"""The conditioning encoder tau_theta of a stage-2 config, described for the trainer and sampler.

``make_cond_stage(config.cond_stage)`` reads ``kind`` and passes the other
fields to the module as keyword arguments (reference ``params`` names):

- ``none``: no module (unconditional model).
- ``class``: ``ClassEmbedder``, trainable; unconditional = null class ``n_classes - 1``.
- ``text``: ``LDMBert`` trained with the UNet; unconditional = empty caption tokens.
- ``clip``: frozen ``CLIPTextModel`` from ``preset`` (default ``"sd_v1"``) plus
  field overrides; unconditional = empty caption tokens.
- ``layout``: ``LayoutEncoder``, trainable; unconditional = layout without objects.
- ``concat``: ``SpatialRescaler`` (``n_stages=0``: identity), trainable when it
  has a ``channel_mapper``; unconditional = zeros.

Other keys: ``checkpoint``, a path to the weights (an original LDM/SD
checkpoint, a diffusers/transformers ``text_encoder`` or an OpenCLIP file),
read by ``ldm_jax.interop.cond_stage``; ``trainable`` to override the default;
``empty_token_ids`` / ``pad_token_id`` for the empty caption (defaults: what
the reference tokenizers give for ``""``).
"""

import dataclasses
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models.clip_text import CLIPTextModel, clip_text_from_preset
from ldm_jax.models.conditioners import ClassEmbedder, LayoutEncoder, SpatialRescaler
from ldm_jax.models.ldm_bert import LDMBert

KINDS = ("none", "class", "text", "clip", "layout", "concat")
_RESERVED = ("kind", "preset", "checkpoint", "trainable", "empty_token_ids", "pad_token_id")
# Reference params that describe tokenisation, which our data pipeline does.
_REFERENCE_ONLY = ("use_tokenizer",)
# Empty caption "" through the reference tokenizers: bert-base-uncased [CLS] [SEP] [PAD]...;
# CLIP <|startoftext|> <|endoftext|>, padded with <|endoftext|> (OpenAI, SD v1) or 0 (OpenCLIP, SD v2).
_BERT_EMPTY, _BERT_PAD = (101, 102), 0
_CLIP_EMPTY = (49406, 49407)
_CLIP_PAD = {"sd_v1": 49407, "sd_v2": 0, "sd_v2_diffusers": 0, "tiny": 49407}


@dataclasses.dataclass(frozen=True)
class CondStage:
  """What stage 2 needs to know about its conditioning encoder."""

  kind: str
  module: nn.Module | None
  trainable: bool
  mode: str | None  # "crossattn", "concat" or None (unconditional)
  output_dim: int | None  # context dim (crossattn) or channels (concat)
  unconditional: Callable[[Any], Any]  # conditional input -> null input of the same shape
  checkpoint: str | None = None
  checkpoint_prefix: str = ""  # where the module sits in an original LDM/SD state dict
  ignore_keys: tuple[str, ...] = ()  # regexes of checkpoint keys the module does not use

  def init(self, rng: jax.Array, cond_input: Any) -> dict[str, Any] | None:
    """Freshly initialised variables (None without a module).

    A stage with a ``checkpoint`` refuses: its weights come from
    ``ldm_jax.interop.cond_stage.cond_stage_variables``.
    """
    if self.module is None:
      return None
    if self.checkpoint is not None:
      raise ValueError(f"the cond stage's weights are in {self.checkpoint!r}: read them with "
                       "ldm_jax.interop.cond_stage.cond_stage_variables, not CondStage.init")
    return jax.jit(self.module.init)(rng, cond_input)

  def encode(self, variables: Mapping[str, Any] | None, cond_input: Any, **kwargs: Any) -> Any:
    """tau_theta(y): the context (or concat map); None for an unconditional model."""
    return None if self.module is None else self.module.apply(variables, cond_input, **kwargs)


def make_cond_stage(config: Mapping[str, Any]) -> CondStage:
  """Builds the :class:`CondStage` a ``cond_stage`` config section describes."""
  fields = dict(config.to_dict() if hasattr(config, "to_dict") else config)
  kind = fields.pop("kind", None)
  if kind not in KINDS:
    raise ValueError(f"unknown cond_stage kind {kind!r}; valid kinds: {', '.join(KINDS)}")
  reserved = {k: fields.pop(k) for k in _RESERVED[1:] if k in fields}
  for key in _REFERENCE_ONLY:
    fields.pop(key, None)
  for key in ("dtype", "param_dtype"):
    if isinstance(fields.get(key), str):
      fields[key] = jnp.dtype(fields[key])
  if kind != "clip" and "preset" in reserved:
    raise ValueError(f"'preset' only applies to kind 'clip', not {kind!r}")
  stage = _BUILDERS[kind](fields, reserved)
  if "trainable" in reserved:
    stage = dataclasses.replace(stage, trainable=bool(reserved["trainable"]))
  return dataclasses.replace(stage, checkpoint=reserved.get("checkpoint"))


def _module(cls: type, fields: dict[str, Any], kind: str, build: Callable[..., nn.Module] | None = None) -> nn.Module:
  """``(build or cls)(**fields)`` after checking the field names against ``cls``."""
  valid = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  unknown = sorted(set(fields) - valid)
  if unknown:
    raise ValueError(f"cond_stage kind {kind!r} ({cls.__name__}) has no fields {unknown}; valid: {sorted(valid)}")
  return (build or cls)(**fields)


# The null-input makers are frozen dataclasses, not closures, so that equal
# configs build equal (hashable) models: the sampling program is jitted with
# the model static and is shared by every pipeline of the same model.
@dataclasses.dataclass(frozen=True)
class EmptyCaption:
  """Token rows of the empty caption ``""``, as many as the conditional rows."""

  empty_ids: tuple[int, ...]
  pad_id: int

  def __call__(self, cond_tokens_BxL: Any) -> np.ndarray:
    b, length = np.shape(cond_tokens_BxL)
    row = (list(self.empty_ids) + [self.pad_id] * length)[:length]
    return np.tile(np.asarray(row, np.int32), (b, 1))


@dataclasses.dataclass(frozen=True)
class NullClass:
  """The null class label, in the labels' shape."""

  label: int

  def __call__(self, labels: Any) -> np.ndarray:
    return np.full(np.shape(labels), self.label, np.int32)


@dataclasses.dataclass(frozen=True)
class EmptyLayout:
  """Layout tokens without objects, one row per conditional row."""

  module: LayoutEncoder

  def __call__(self, cond_tokens_BxL: Any) -> np.ndarray:
    return self.module.empty_layout_tokens(np.shape(cond_tokens_BxL)[0])


def _no_input(cond: Any) -> None:
  return None


def _none(fields, reserved) -> CondStage:
  if fields:
    raise ValueError(f"cond_stage kind 'none' takes no fields, got {sorted(fields)}")
  return CondStage("none", None, False, None, None, _no_input)


def _class(fields, reserved) -> CondStage:
  module = _module(ClassEmbedder, fields, "class")
  null = NullClass(module.null_class)
  return CondStage("class", module, True, "crossattn", module.embed_dim, null, checkpoint_prefix="cond_stage_model.")


def _text(fields, reserved) -> CondStage:
  module = _module(LDMBert, fields, "text")
  null = EmptyCaption(
      tuple(reserved.get("empty_token_ids", _BERT_EMPTY)), reserved.get("pad_token_id", _BERT_PAD)
  )
  return CondStage(
      "text", module, True, "crossattn", module.n_embed, null,
      checkpoint_prefix="cond_stage_model.transformer.", ignore_keys=LDMBert.unused_checkpoint_keys,
  )


def _clip(fields, reserved) -> CondStage:
  preset = reserved.get("preset", "sd_v1")
  module = _module(CLIPTextModel, fields, "clip", partial(clip_text_from_preset, preset))
  null = EmptyCaption(
      tuple(reserved.get("empty_token_ids", _CLIP_EMPTY)), reserved.get("pad_token_id", _CLIP_PAD.get(preset, 49407))
  )
  ignore = (r"^text_projection\.",) if module.projection_dim is None else ()
  return CondStage(
      "clip", module, False, "crossattn", module.hidden_size, null,
      checkpoint_prefix="cond_stage_model.transformer.", ignore_keys=ignore,
  )


def _layout(fields, reserved) -> CondStage:
  module = _module(LayoutEncoder, fields, "layout")
  null = EmptyLayout(module)
  return CondStage(
      "layout", module, True, "crossattn", module.n_embed, null,
      checkpoint_prefix="cond_stage_model.transformer.", ignore_keys=LDMBert.unused_checkpoint_keys,
  )


def _concat(fields, reserved) -> CondStage:
  module = _module(SpatialRescaler, fields, "concat")
  channels = module.out_channels if module.out_channels is not None else module.in_channels
  return CondStage(
      "concat", module, module.out_channels is not None, "concat", channels, jnp.zeros_like,
      checkpoint_prefix="cond_stage_model.",
  )


_BUILDERS = {"none": _none, "class": _class, "text": _text, "clip": _clip, "layout": _layout, "concat": _concat}
