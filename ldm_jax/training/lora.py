"""LoRA fine-tuning in the stage-2 step: ``config.lora`` and the weights the model runs with.

With ``lora.rank > 0`` the train state's ``params`` hold the adapters
(``params["lora"]``, plus any trainable conditioning encoder) and the
pretrained UNet sits in ``frozen["unet"]``: only adapters are trained,
checkpointed, averaged by the EMA and sharded. :func:`model_params` gives
the weights the model runs with (the base plus the adapters' update), in the
step and for sampling.
"""

from typing import Any

import ml_collections

from ldm_jax.nn.lora import LoRAConfig, apply_adapters


def default_lora_config() -> ml_collections.ConfigDict:
  """``config.lora``: off while ``rank`` is 0."""
  return ml_collections.ConfigDict(dict(
      rank=0,  # > 0: train rank-r adapters instead of every UNet weight
      alpha=4.0,  # the update is scaled by alpha / rank
      # Groups of ldm_jax.nn.lora.TARGET_GROUPS ("attention", "proj", "ff", "conv") or regexes over module paths.
      targets=("attention",),
      init="kaiming_uniform",  # of the down projection ("gaussian": N(0, 1/rank²)); up starts at zero
  ))


def lora_config(config: ml_collections.ConfigDict) -> LoRAConfig | None:
  """The run's ``LoRAConfig``, or None for full fine-tuning (no ``lora`` section, or rank 0)."""
  section = config.get("lora")
  if section is None or not section.rank:
    return None
  return LoRAConfig(rank=int(section.rank), alpha=float(section.alpha), targets=tuple(section.targets),
                    init=section.init)


def model_params(params: dict, frozen: Any, lora: LoRAConfig | None) -> dict:
  """The weights the model runs with: ``params`` itself, or the frozen UNet with the adapters' update."""
  if lora is None:
    return params
  out = {k: v for k, v in params.items() if k != "lora"}
  out["unet"] = apply_adapters(frozen["unet"], params["lora"], lora)
  return out
