"""Evaluate a model or a folder of images: FID, KID, IS, precision/recall, rFID, rIS, PSNR, SSIM, LPIPS.

  python evaluate.py --checkpoint runs/cin --recipe cin256_v2 --inception_weights fid_inception.npz
  python evaluate.py --checkpoint RUN --metrics fid,kid --num_samples 10000 --steps 50 --guidance 3
  python evaluate.py --checkpoint STAGE1_RUN --metrics rfid,ris,psnr,ssim,lpips --inception_weights fid_inception.npz \
      --lpips_weights lpips_vgg.npz
  python evaluate.py --checkpoint SR_MODEL --metrics fid,is,psnr,ssim --num_samples 10000 --steps 100 \
      --inception_weights fid_inception.npz
  python evaluate.py --checkpoint INPAINT_MODEL --metrics fid,lpips --ref_dir held_out/ --mask_seed 0 \
      --inception_weights fid_inception.npz --lpips_weights lpips_vgg.npz
  python evaluate.py --images_dir samples/ --ref_stats celebahq_train.npz --inception_weights fid_inception.npz
  python evaluate.py --config configs/ldm.py:celebahq_vq4 --split train --save_stats celebahq_train.npz \
      --metrics= --inception_weights fid_inception.npz

Writes a JSON report (--output) with the metric values and everything
needed to reproduce them: checkpoint and step, sampler settings, number of
samples, seed, reference data, the feature network's weights file and its
SHA-256, library versions and this command line.
"""

import sys

from absl import app, flags

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Stage-2 run directory / published model (samples) or "
                                  "stage-1 run directory (reconstructions).")
_IMAGES = flags.DEFINE_string("images_dir", None, "Evaluate this folder of images instead of sampling.")
_METRICS = flags.DEFINE_list("metrics", ["fid"], "Comma-separated: fid, kid, is, pr, clip_score (samples, "
                             "folders); rfid, ris, psnr, ssim, lpips (stage-1 runs); fid, kid, is, pr, psnr, ssim, "
                             "lpips (super-resolution and inpainting models, against held-out images).")
_RECIPE = flags.DEFINE_string("recipe", None, "Paper settings (ldm_jax/evaluation/recipes.py): celebahq, ffhq, "
                              "lsun_churches, lsun_bedrooms, cin256_v2, txt2img_coco. Explicit flags win.")
_NUM = flags.DEFINE_integer("num_samples", 1000, "Images to sample.")
_SAMPLER = flags.DEFINE_string("sampler", "ddim", "ddim | plms | pndm | dpmpp_2m | euler | euler_ancestral | ddpm")
_STEPS = flags.DEFINE_integer("steps", 50, "Sampler steps.")
_ETA = flags.DEFINE_float("eta", 0.0, "DDIM eta.")
_GUIDANCE = flags.DEFINE_float("guidance", 1.0, "Classifier-free guidance scale (1: off).")
_GUIDANCE_INTERVAL = flags.DEFINE_list(
    "guidance_interval", None, "LOW,HIGH: guide only at model timesteps LOW <= t <= HIGH (default: every step).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (image i uses (seed, i)).")
_PROMPTS = flags.DEFINE_string("prompts_file", None, "Prompts, one per line (default: the split's captions).")
_CLASSES = flags.DEFINE_string("classes", "split", "Class-conditional models: labels of the split, or 'balanced'.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 0, "Classes for --classes=balanced (default: the model's).")
_CONFIG = flags.DEFINE_string("config", None, "Config spec whose data section is the reference dataset "
                              "(default: the run directory's).")
_SPLIT = flags.DEFINE_string("split", None, "Reference split (default: config.data.eval_split).")
_NUM_REAL = flags.DEFINE_integer("num_real", -1, "Reference images to use (-1: the whole split).")
_REF_STATS = flags.DEFINE_string("ref_stats", None, "Reference FID statistics .npz (mu, sigma).")
_REF_DIR = flags.DEFINE_string("ref_dir", None, "Reference folder of images.")
_SAVE_STATS = flags.DEFINE_string("save_stats", None, "Write the reference's statistics to this .npz.")
_SAVE_IMAGES = flags.DEFINE_string("save_images", None, "Also write the samples as PNGs to this folder.")
_NET = flags.DEFINE_string("feature_net", "inception", "inception | shapes_judge | random_inception (tests only).")
_INCEPTION = flags.DEFINE_string("inception_weights", "", "Converted FID Inception weights (.npz / .safetensors).")
_JUDGE = flags.DEFINE_string("judge_weights", "", "Shapes judge weights (--feature_net=shapes_judge).")
_CLIP = flags.DEFINE_string("clip_weights", "", "transformers CLIP model folder (clip_score).")
_LPIPS = flags.DEFINE_string("lpips_weights", "", "Converted LPIPS weights (python -m ldm_jax.interop.lpips).")
_MASK_SEED = flags.DEFINE_integer("mask_seed", 0, "Inpainting models: seed of the held-out images' fixed holes.")
_SIZE = flags.DEFINE_integer("image_size", 0, "Folder images are resized and cropped to this (default: data size).")
_BATCH = flags.DEFINE_integer("batch_size", 50, "Images per sampler / network call.")
_KID = flags.DEFINE_integer("kid_subset_size", 1000, "KID subset size (capped at the number of images).")
_DTYPE = flags.DEFINE_string("dtype", None, "Compute dtype override for sampling, e.g. bfloat16.")
_OUTPUT = flags.DEFINE_string("output", "eval_report.json", "The JSON report.")

_FIELDS = {f.name: f for f in (_CHECKPOINT, _IMAGES, _METRICS, _RECIPE, _NUM, _SAMPLER, _STEPS, _ETA, _GUIDANCE,
                                _GUIDANCE_INTERVAL, _SEED, _PROMPTS, _CLASSES, _NUM_CLASSES, _CONFIG, _SPLIT,
                                _NUM_REAL, _REF_STATS, _REF_DIR, _SAVE_STATS, _SAVE_IMAGES, _NET, _INCEPTION, _JUDGE,
                                _CLIP, _LPIPS, _MASK_SEED, _SIZE, _BATCH, _KID, _DTYPE, _OUTPUT)}


def main(argv):
  del argv
  from ldm_jax.apps.evaluate import EvalRequest, run

  values = {name: holder.value for name, holder in _FIELDS.items()}
  request = EvalRequest(**values, command=list(sys.argv))
  explicit = {name for name in _FIELDS if flags.FLAGS[name].present}
  try:
    request.apply_recipe(explicit)
    request.validate()
    report = run(request)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  print(f"{report.get('metrics', {})} -> {request.output}")


if __name__ == "__main__":
  app.run(main)
