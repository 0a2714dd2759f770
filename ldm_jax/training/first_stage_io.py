"""Loading a trained first stage: for stage 2 and for ``reconstruct.py``.

A stage-1 run directory (``train.py --config configs/autoencoder.py``)
holds ``checkpoints/<step>/{state,meta}``; ``meta`` carries the model
config and the latent scale factor computed from the saved weights. Only
the autoencoder's parameters are read, never the optimiser or
discriminator state.

Pretrained files (original LDM ``.ckpt``, diffusers ``.safetensors``) are a
separate loader (``ldm_jax.interop``); :func:`load_first_stage` dispatches on
the path type and names that case.
"""

import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

from ldm_jax.models.autoencoder import AutoencoderKL
from ldm_jax.models.first_stage import make_first_stage
from ldm_jax.models.vq import VQModel
from ldm_jax.training.checkpoint import Checkpointer, nest, restore_subtree

# Where the autoencoder's params sit in the stage-1 state (Stage1State.params["ae"]).
AE_PARAMS_PATH = ("params", "ae")
STAGE = "autoencoder"


def load_first_stage(
    path: str | os.PathLike,
    *,
    model_config: Mapping[str, Any] | None = None,
    step: int | None = None,
    sharding: jax.sharding.Sharding | None = None,
) -> tuple[AutoencoderKL | VQModel, dict, float, dict]:
  """``(model, variables, scale_factor, model_config)`` of a trained first stage.

  Args:
    path: a stage-1 run directory (or its ``checkpoints`` folder).
    model_config: ``{kind, embed_dim, n_embed, ddconfig}`` to build instead
      of the stored one (e.g. a stage-2 config's ``first_stage``); arrays
      that do not fit it are named in one :class:`CheckpointMismatchError`.
    step: the checkpoint to read (default: the latest).
    sharding: where to place the weights (default: the first local device).
  """
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if os.path.isfile(path):
    raise NotImplementedError(
        f"{path} is a file: loading pretrained first stages (original LDM .ckpt, diffusers "
        "files) is not supported here; pass a stage-1 run directory (train.py --workdir)"
    )
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no stage-1 run directory at {path!r}")
  return _load_run(path, model_config, step, sharding)


def first_stage_meta(model_config: Mapping[str, Any], scale_factor: float, **extra: Any) -> dict:
  """The checkpoint metadata :func:`load_first_stage` reads (plus ``extra``)."""
  return {"stage": STAGE, "model": dict(model_config), "scale_factor": float(scale_factor), **extra}


def save_first_stage(
    run_dir: str | os.PathLike, params: Any, model_config: Mapping[str, Any], scale_factor: float, *, step: int = 0
) -> str:
  """Writes autoencoder ``params`` as a run directory :func:`load_first_stage`
  reads (e.g. weights converted from elsewhere); returns its checkpoint folder.

  Only the weights are stored: training cannot resume from it.
  """
  ckpt_dir = os.path.join(os.path.abspath(os.fspath(run_dir)), "checkpoints")
  checkpointer = Checkpointer(ckpt_dir, async_save=False)
  try:
    checkpointer.save(step, nest(AE_PARAMS_PATH, params), meta=first_stage_meta(model_config, scale_factor))
  finally:
    checkpointer.close()
  return ckpt_dir


def _checkpoint_dir(run_dir: str) -> str:
  nested = os.path.join(run_dir, "checkpoints")
  return nested if os.path.isdir(nested) else run_dir


def _load_run(run_dir, model_config, step, sharding):
  ckpt_dir = _checkpoint_dir(run_dir)
  manager = ocp.CheckpointManager(
      ckpt_dir,
      options=ocp.CheckpointManagerOptions(create=False),
      item_handlers={"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
  )
  try:
    steps = manager.all_steps()
    if not steps:
      raise FileNotFoundError(
          f"no checkpoint in {ckpt_dir!r}: not a stage-1 run directory (expected {run_dir}/checkpoints/<step>)"
      )
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise FileNotFoundError(f"no checkpoint {step} in {ckpt_dir!r}; available steps: {sorted(steps)}")
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"] or {}
    if meta.get("stage") != STAGE:
      raise ValueError(
          f"checkpoint {step} in {ckpt_dir!r} is not a first stage (its metadata says stage "
          f"{meta.get('stage')!r}, expected {STAGE!r})"
      )
    model_config = dict(model_config if model_config is not None else meta["model"])
    model = make_first_stage(model_config)
  finally:
    manager.close()
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  params = restore_subtree(ckpt_dir, step, AE_PARAMS_PATH, _abstract_params(model), sharding, what="the first stage")
  return model, {"params": params}, float(meta["scale_factor"]), model_config


def _abstract_params(model: AutoencoderKL | VQModel) -> Any:
  """Parameter shapes of ``model`` (nothing is allocated)."""
  size = model.downsample_factor
  x = jax.ShapeDtypeStruct((1, size, size, model.ddconfig.get("in_channels", 3)), jax.numpy.float32)
  kw = {"sample_posterior": False} if isinstance(model, AutoencoderKL) else {}
  return jax.eval_shape(lambda rng, x: model.init(rng, x, **kw), jax.random.key(0), x)["params"]
