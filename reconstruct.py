"""Encode and decode a folder of images with a trained first stage.

  python reconstruct.py --checkpoint runs/ae --input photos/ --output recon/ [--size 256]

Writes ``recon/<same relative name>.png`` and ``recon/psnr.json`` (per-image
and mean PSNR of the 8-bit reconstruction against the resized, centre-cropped
input); unreadable images are skipped and listed.
"""

from absl import app, flags

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Stage-1 run directory (train.py --workdir).", required=True)
_INPUT = flags.DEFINE_string("input", None, "Folder of images (searched recursively).", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Folder for the reconstructions and psnr.json.", required=True)
_SIZE = flags.DEFINE_integer("size", 256, "Images are resized (shorter side) and centre-cropped to this square.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per forward pass.")


def main(argv):
  del argv
  from ldm_jax.apps.reconstruct import reconstruct_folder

  report = reconstruct_folder(_CHECKPOINT.value, _INPUT.value, _OUTPUT.value, size=_SIZE.value,
                              batch_size=_BATCH.value)
  for item in report["skipped"]:
    print(f"skipped {item['path']}: {item['error']}")
  print(f"{len(report['psnr'])} images reconstructed into {_OUTPUT.value}; "
        f"mean PSNR {report['mean_psnr']:.2f} dB (per image: {_OUTPUT.value}/psnr.json)")


if __name__ == "__main__":
  app.run(main)
