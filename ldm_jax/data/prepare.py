"""Turn an image folder into ArrayRecord shards the ``array_record`` source reads.

  python -m ldm_jax.data.prepare --input DIR --output OUT_DIR [--num-shards N] [--split train]

Images are searched recursively (.jpg .jpeg .png .webp .bmp); each one's
caption is its same-name .txt file (nil without one: ``data.missing_caption``
decides at training time). The image files' bytes are stored unchanged, in
sorted path order, with their captions and relative paths, as
``OUT_DIR/<split>.array_record-XXXXX-of-NNNNN`` plus
``OUT_DIR/<split>.metadata.json``. Unreadable images are kept here and
skipped (and counted) by the input pipeline.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from ldm_jax.data.array_record_source import encode_record, write_metadata, write_shards
from ldm_jax.data.folder_source import find_caption, list_images


def prepare_folder(
    input_dir: str | os.PathLike, output_dir: str | os.PathLike, num_shards: int = 1, split: str = "train"
) -> dict:
  """Writes the shards and metadata; returns the metadata."""
  relative_paths = list_images(input_dir)

  def records():
    for relative in relative_paths:
      path = os.path.join(input_dir, relative)
      with open(path, "rb") as f:
        yield encode_record(f.read(), find_caption(path), relative)

  shards = write_shards(records(), len(relative_paths), output_dir, split, num_shards)
  metadata = {
      "split": split,
      "num_records": len(relative_paths),
      "num_shards": len(shards),
      "shards": [os.path.basename(s) for s in shards],
      "input_dir": os.path.abspath(input_dir),
      "fields": {"image": "encoded image file bytes", "caption": "str, nil without a caption file",
                 "path": "str, relative to input_dir"},
  }
  write_metadata(output_dir, split, metadata)
  return metadata


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m ldm_jax.data.prepare", description=__doc__.split("\n\n")[0])
  parser.add_argument("--input", required=True, help="folder of images (searched recursively)")
  parser.add_argument("--output", required=True, help="folder to write shards and metadata into")
  parser.add_argument("--num-shards", type=int, default=1, help="number of shards (about 1 GB each is practical)")
  parser.add_argument("--split", default="train", help="split name, the shards' file prefix")
  args = parser.parse_args(argv)
  try:
    metadata = prepare_folder(args.input, args.output, args.num_shards, args.split)
  except (FileNotFoundError, ValueError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  print(f"Wrote {metadata['num_records']} records in {metadata['num_shards']} shard(s) to {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
