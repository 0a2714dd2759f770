"""The end-to-end demo on the built-in shapes dataset (README, command 1).

  python demo.py --workdir runs/demo
  python demo.py --workdir runs/demo --ldm train.num_steps=10000   # longer stage 2

Trains the autoencoder, then a text-conditional LDM, samples prompts whose
colour-shape pairs were withheld from training, and judges them; the
figures go to RUN/demo_results.json. Rerunning resumes every phase; rerun
with more steps (``--ae`` / ``--ldm KEY=VALUE``, any key of the stage's
config) and that stage continues from its last checkpoint. Exit status: 0
when done, 143 (PREEMPTED_EXIT_CODE) when SIGTERM stopped it, 1 on an error.
"""

import sys

from absl import app, flags

from ldm_jax.training.preemption import PREEMPTED_EXIT_CODE, exit_on_sigterm

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Run folder (both stages, samples, results).")
_GUIDANCE = flags.DEFINE_float("guidance", 6.0, "Classifier-free guidance scale of the judged samples.")
_PER_PROMPT = flags.DEFINE_integer("images_per_prompt", 8, "Samples per held-out prompt.")
_TINY = flags.DEFINE_bool("tiny", False, "Seconds-long stages to check the plumbing (meaningless figures).")
_AE = flags.DEFINE_multi_string("ae", [], "KEY=VALUE override of the stage-1 config (configs/autoencoder.py:demo).")
_LDM = flags.DEFINE_multi_string("ldm", [], "KEY=VALUE override of the stage-2 config (configs/ldm.py:shapes_txt2img).")


def main(argv):
  del argv
  from ldm_jax.apps.demo import DemoPreempted, DemoSettings, demo_configs, parse_override, run_demo
  from ldm_jax.parallel.runtime import setup_runtime

  try:
    settings = DemoSettings(
        tiny=_TINY.value, guidance_scale=_GUIDANCE.value, images_per_prompt=_PER_PROMPT.value,
        ae_overrides=tuple(parse_override(o) for o in _AE.value),
        ldm_overrides=tuple(parse_override(o) for o in _LDM.value))
    ae_config, _ = demo_configs(_WORKDIR.value, settings)  # fails on a bad key before anything trains
  except (KeyError, TypeError, ValueError) as e:
    raise app.UsageError(e.args[0] if e.args else str(e)) from None  # str(KeyError) would add quotes
  # One process runs both stages, so the stage-1 config's device split serves the whole demo.
  setup_runtime(compilation_cache_dir="~/.cache/ldm_jax/xla", cpu_devices=ae_config.mesh.cpu_devices)
  try:
    run_demo(_WORKDIR.value, settings)
  except DemoPreempted as e:
    print(f"demo stopped: {e}", file=sys.stderr)
    sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
  exit_on_sigterm()
  app.run(main)
