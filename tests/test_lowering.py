"""TPU and GPU lowering without the chip: the stage-2 training step and the sampler of a tiny config
are exported (``jax.export``) for ``tpu`` and ``cuda`` from shapes only.

Nothing is computed or compiled: lowering to StableHLO is where an operation
without a rule for a platform fails, so such an operation is caught here on a
CPU. ``benchmarks/lowering.py`` does the same for SD 1.5 at full size.
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest
from jax import export

from ldm_jax.assembly import (
    build_model,
    example_inputs,
    random_first_stage,
    sampler_config,
    schedule_from_config,
    step_config,
)
from ldm_jax.config import load_config
from ldm_jax.data.tokenizers import build_shapes_tokenizer
from ldm_jax.pipeline import _generate
from ldm_jax.training import ldm_step
from ldm_jax.training.optim import make_optimizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is a top-level folder, not part of the installed package

from benchmarks.compilation import custom_call_targets, mlir_op_counts  # noqa: E402

PLATFORMS = ("tpu", "cuda")
# Custom calls every platform implements (sharding annotations); anything else in a
# module exported for two platforms would be worth a look.
PORTABLE_CUSTOM_CALLS = {"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape"}


def _abstract(tree):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), tree)


@pytest.fixture(scope="module")
def exported() -> dict[str, export.Exported]:
  """Both programs of ``shapes_txt2img,tiny``, exported once for the module's tests."""
  config = load_config(str(ROOT / "configs/ldm.py:shapes_txt2img,tiny"))
  first_stage = random_first_stage(config.first_stage, config.data.image_size, abstract=True)
  model = build_model(config, first_stage.model_config, first_stage.scale_factor, build_shapes_tokenizer())
  frozen = {"first_stage": first_stage.variables}
  cfg, schedule = step_config(config), schedule_from_config(config.diffusion)
  tx, _ = make_optimizer(config.optim, config.train.num_steps, config.train.batch_size)
  size, side = config.data.image_size, config.data.image_size // model.downsample_factor
  init = ldm_step.make_init_fn(model, tx, cfg, example_inputs(model, config), frozen, (1, side, side, 3))
  key = jax.eval_shape(lambda: jax.random.key(0))
  state = jax.eval_shape(init, key)
  batch, tokens = config.train.batch_size, config.data.tokenizer.max_length
  # Images, not cached latents: the step runs the frozen encoder too.
  train_batch = {"image": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
                 "tokens": jax.ShapeDtypeStruct((batch, tokens), jnp.int32)}
  step = jax.jit(ldm_step.make_train_step(model, schedule, tx, cfg), donate_argnums=(0,))
  programs = {"train_step": export.export(step, platforms=PLATFORMS)(state, train_batch, key, frozen)}

  prompts = {"tokens": jax.ShapeDtypeStruct((2, tokens), jnp.int32)}
  scalar = jax.ShapeDtypeStruct((), jnp.float32)
  x_T = jax.ShapeDtypeStruct((2, side, side, model.latent_channels), jnp.float32)
  programs["sampler"] = export.export(_generate, platforms=PLATFORMS)(
      _abstract(schedule), state.ema_params, frozen, prompts, prompts, x_T, key, scalar, scalar, None, None,
      None, scalar,  # no image-space guidance
      model=model, sampler_config=sampler_config(config), strength=None, guided=True, blend=False, guide=None,
  )
  return programs


@pytest.mark.parametrize("program", ["train_step", "sampler"])
def test_program_lowers_for_tpu_and_cuda(exported, program):
  exp = exported[program]
  assert exp.platforms == PLATFORMS
  text = exp.mlir_module()
  ops = mlir_op_counts(text)
  assert ops.get("stablehlo.convolution", 0) > 0 and ops.get("stablehlo.dot_general", 0) > 0
  assert set(custom_call_targets(text)) <= PORTABLE_CUSTOM_CALLS


def test_sampler_is_one_loop(exported):
  assert mlir_op_counts(exported["sampler"].mlir_module())["stablehlo.while"] == 1  # the steps' lax.scan
