"""The FID Inception-v3's published weights: converting pytorch-fid's file once, and reading the result.

    python -m ldm_jax.interop.inception --convert pt_inception-2015-12-05-6726825d.pth --out fid_inception.npz

The network is ``ldm_jax.evaluation.inception``.
"""

import argparse
from typing import Any

from ldm_jax.evaluation.inception import InceptionV3, variables_template
from ldm_jax.interop import naming, weights

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
CONVERT_COMMAND = "python -m ldm_jax.interop.inception --convert pt_inception-2015-12-05-6726825d.pth --out"


def convert_inception_state_dict(state_dict: dict[str, Any], model: InceptionV3 | None = None) -> dict[str, Any]:
  """pytorch-fid state dict (``Mixed_5b.branch1x1.conv.weight``, ...) -> our variables.

  Every key is checked: missing, unexpected and mis-shaped entries are
  reported together.
  """
  model = model or InceptionV3()
  return naming.torch_to_flax(state_dict, variables_template(model), what="Inception state dict")


def convert_inception_checkpoint(src: str, dst: str, model: InceptionV3 | None = None) -> None:
  """Converts pytorch-fid's ``.pth`` (or a ``.safetensors`` copy) into ``.npz`` / ``.safetensors``."""
  weights.save_variables(dst, convert_inception_state_dict(weights.read_state_dict(src), model))


def load_inception_params(path: str, model: InceptionV3 | None = None) -> dict[str, Any]:
  """Loads converted variables (``{"params", "batch_stats"}``), checked against ``model``."""
  how = f"Download {FID_WEIGHTS_URL} and convert it with `{CONVERT_COMMAND} {path}`."
  variables = weights.load_variables(path, what="FID Inception weights", how_to_get=how)
  weights.check_variables(variables, variables_template(model or InceptionV3()), what=f"FID Inception file {path}")
  return variables


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description="Convert pytorch-fid's Inception weights for ldm_jax.")
  parser.add_argument("--convert", required=True, help="pt_inception-2015-12-05-6726825d.pth (or .safetensors)")
  parser.add_argument("--out", required=True, help="output .npz or .safetensors")
  args = parser.parse_args(argv)
  convert_inception_checkpoint(args.convert, args.out)
  print(f"Wrote {args.out}")


if __name__ == "__main__":
  main()
