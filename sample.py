"""Sample images from a trained (or published) latent diffusion model.

  python sample.py --checkpoint runs/demo/ldm --prompt "a large red circle" --num 4
  python sample.py --checkpoint RUN --class_label 7 --sampler dpmpp_2m --steps 25
  python sample.py --checkpoint RUN --prompt "..." --init_image in.png --strength 0.6
  python sample.py --checkpoint RUN --prompt "..." --init_image in.png --mask mask.png
  python sample.py --checkpoint SR_MODEL --low_res small.png --image_guidance low_res --image_guidance_strength 1
  python sample.py --checkpoint INPAINT_MODEL --init_image in.png --mask hole.png
  python sample.py --checkpoint SEMANTIC_MODEL --segmentation labels.png
  python sample.py --checkpoint LAYOUT_MODEL --layout layout.json
  python sample.py --checkpoint CIN_MODEL --class_label 207 --height 512 --width 512

Writes one PNG per image and a grid to --output, each with its prompt, seed
and settings in the PNG metadata and in samples.json. The same seed and
settings give identical images.
"""

import sys

from absl import app, flags

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Stage-2 run directory or published model.", required=True)
_PROMPT = flags.DEFINE_multi_string("prompt", [], "Text prompt (repeatable).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "File with one prompt per line.")
_CLASS = flags.DEFINE_multi_integer("class_label", [], "Class label (class-conditional models; repeatable).")
_NEGATIVE = flags.DEFINE_string("negative_prompt", "", "Negative prompt (the unconditional input of guidance).")
_NUM = flags.DEFINE_integer("num", 1, "Images per prompt / label (or in total for unconditional models).")
_STEPS = flags.DEFINE_integer("steps", 50, "Sampler steps.")
_SAMPLER = flags.DEFINE_string("sampler", "ddim", "ddim | plms | pndm | dpmpp_2m | euler | euler_ancestral | ddpm")
_ETA = flags.DEFINE_float("eta", 0.0, "DDIM eta (0: deterministic).")
_GUIDANCE = flags.DEFINE_float("guidance", 7.5, "Classifier-free guidance scale (1: off).")
_GUIDANCE_INTERVAL = flags.DEFINE_list(
    "guidance_interval", None, "LOW,HIGH: guide only at model timesteps LOW <= t <= HIGH (default: every step).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_HEIGHT = flags.DEFINE_integer(
    "height", None, "Image height (default: the training size, or the init / conditioning image's); larger than "
    "the training size samples convolutionally.")
_WIDTH = flags.DEFINE_integer("width", None, "Image width (default: as --height).")
_INIT = flags.DEFINE_string("init_image", None, "Start image (image-to-image / inpainting).")
_STRENGTH = flags.DEFINE_float("strength", None, "Image-to-image strength in [0, 1].")
_MASK = flags.DEFINE_string("mask", None, "Inpainting mask image: white = repaint (the hole), black = keep.")
_LOW_RES = flags.DEFINE_string("low_res", None, "Super-resolution models: the low-resolution image to upsample.")
_SEGMENTATION = flags.DEFINE_string(
    "segmentation", None, "Semantic synthesis models: one-channel PNG of integer class labels (the output's size).")
_LAYOUT = flags.DEFINE_string(
    "layout", None, 'Layout-to-image models: JSON {"boxes": [[x0, y0, x1, y1], ...] in [0, 1], "labels": [...]}.')
_IMAGE_GUIDANCE = flags.DEFINE_string(
    "image_guidance", None, "Image-space guidance of the decoded x0 prediction: low_res (super-resolution models).")
_IMAGE_GUIDANCE_STRENGTH = flags.DEFINE_float("image_guidance_strength", 0.0, "Scale of --image_guidance (0: off).")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Images per sampler call.")
_DTYPE = flags.DEFINE_string("dtype", None, "Compute dtype override, e.g. bfloat16 on TPU/GPU.")
_NO_EMA = flags.DEFINE_bool("no_ema", False, "Sample the raw weights instead of their EMA (runs, original SD files).")
_OUTPUT = flags.DEFINE_string("output", "samples", "Output directory.")


def main(argv):
  del argv
  from ldm_jax.apps.sample import SampleRequest, run

  request = SampleRequest(
      checkpoint=_CHECKPOINT.value, prompts=list(_PROMPT.value), prompts_file=_PROMPTS_FILE.value,
      class_labels=list(_CLASS.value), negative_prompt=_NEGATIVE.value, num=_NUM.value, steps=_STEPS.value,
      sampler=_SAMPLER.value, eta=_ETA.value, guidance=_GUIDANCE.value,
      guidance_interval=_GUIDANCE_INTERVAL.value, seed=_SEED.value, height=_HEIGHT.value,
      width=_WIDTH.value, init_image=_INIT.value, strength=_STRENGTH.value, mask=_MASK.value,
      low_res=_LOW_RES.value, segmentation=_SEGMENTATION.value, layout=_LAYOUT.value,
      image_guidance=_IMAGE_GUIDANCE.value, image_guidance_strength=_IMAGE_GUIDANCE_STRENGTH.value,
      batch_size=_BATCH.value, dtype=_DTYPE.value, use_ema=not _NO_EMA.value, output=_OUTPUT.value,
  )
  try:
    request.validate()
    run(request)
  except ValueError as e:  # bad flags, and checkpoints that cannot be loaded: one line, no traceback
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
