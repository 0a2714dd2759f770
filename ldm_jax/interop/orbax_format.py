"""A published checkpoint converted once into ldm_jax's own format: orbax weights plus a JSON description.

Converting a diffusers folder or an original ``.safetensors``/``.ckpt`` means
renaming and transposing every tensor on the host each time it is loaded.
The converted folder loads straight into our modules (orbax restores the
arrays, nothing is renamed), needs neither torch nor the original files, and
``load_pipeline`` / ``sample.py --checkpoint`` accept it like any other format:

    OUT/ldm_pipeline.json   model description, schedule, prediction type, sampler defaults
    OUT/weights/            orbax checkpoint of {"params": ..., "frozen": ...} (float32)
    OUT/tokenizer/          the checkpoint's tokenizer files (when it has a text encoder)

    python -m ldm_jax.interop.orbax_format SOURCE OUT [--no-ema] [--config X.yaml] [--tokenizer DIR]

Loading gives exactly the arrays the conversion produced (a round trip is
bit-exact). Our own training runs are orbax checkpoints already.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from ldm_jax.interop import pretrained

DESCRIPTION_FILE = "ldm_pipeline.json"
FORMAT_VERSION = 1
# Loaded again from the saved tokenizer folder or weights, so not described in JSON.
_NOT_DESCRIBED = ("state", "cond_state", "tokenizer", "what")


def is_orbax_pipeline(path: str) -> bool:
  return os.path.isfile(os.path.join(path, DESCRIPTION_FILE))


def convert(source: str, out_dir: str, **read_kw) -> str:
  """Converts a published checkpoint (anything ``load_pretrained_pipeline`` reads) into ``out_dir``."""
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and os.listdir(out_dir):
    raise FileExistsError(f"{out_dir} exists and is not empty; choose a new folder")
  parts = pretrained.read_parts(source, **read_kw)
  model, _, max_length = pretrained.build_from_parts(parts, "float32")
  params, frozen = pretrained.convert_weights(model, parts, max_length)  # validates every weight, on the host
  os.makedirs(out_dir, exist_ok=True)
  description = {k: v for k, v in parts.items() if k not in _NOT_DESCRIBED}
  with open(os.path.join(out_dir, DESCRIPTION_FILE), "w") as f:
    json.dump({"format": "ldm_jax.orbax_pipeline", "version": FORMAT_VERSION, "source": os.path.abspath(source),
               "parts": description}, f, indent=1, default=_json_default)
  if parts["tokenizer"] is not None:
    shutil.copytree(parts["tokenizer"], os.path.join(out_dir, "tokenizer"))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(out_dir, "weights"), {"params": params, "frozen": frozen})
  return out_dir


def load(path: str, *, mesh=None, compute_dtype: str | None = None):
  """The ``LDMPipeline`` of a folder written by :func:`convert`."""
  with open(os.path.join(path, DESCRIPTION_FILE)) as f:
    saved = json.load(f)
  if saved.get("format") != "ldm_jax.orbax_pipeline" or saved.get("version") != FORMAT_VERSION:
    raise ValueError(f"{path}/{DESCRIPTION_FILE} is not an ldm_jax orbax pipeline of version {FORMAT_VERSION} "
                     f"(format {saved.get('format')!r}, version {saved.get('version')!r})")
  parts = _tuples(saved["parts"])
  if "betas" in parts["schedule"]:
    parts["schedule"] = {"betas": np.asarray(parts["schedule"]["betas"], np.float64)}
  tokenizer_dir = os.path.join(path, "tokenizer")
  parts["tokenizer"] = tokenizer_dir if os.path.isdir(tokenizer_dir) else None
  model, tok, max_length = pretrained.build_from_parts(parts, compute_dtype or "float32")
  params, frozen = pretrained.split_params_frozen(model, pretrained.weight_templates(model, max_length))
  device = jax.sharding.make_single_device_sharding(jax.local_devices()[0])
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                        {"params": params, "frozen": frozen})
  with ocp.StandardCheckpointer() as checkpointer:
    weights = checkpointer.restore(os.path.join(path, "weights"), target)
  return pretrained.pipeline_from_parts(parts, model, tok, max_length, weights["params"], weights["frozen"], mesh)


def _json_default(value: Any) -> Any:
  if isinstance(value, (np.ndarray, np.generic)):
    return value.tolist()
  raise TypeError(f"cannot describe {type(value).__name__} {value!r} in {DESCRIPTION_FILE}")


def _tuples(tree: Any) -> Any:
  """JSON lists back to the tuples our module fields hold."""
  if isinstance(tree, dict):
    return {k: _tuples(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return tuple(_tuples(v) for v in tree)
  return tree


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("source", help="diffusers folder or original checkpoint file")
  parser.add_argument("out", help="new folder to write")
  parser.add_argument("--no-ema", action="store_true", help="original files: take the non-EMA UNet weights")
  parser.add_argument("--config", default=None, help="original files: the reference YAML config")
  parser.add_argument("--tokenizer", default=None, help="original files: tokenizer folder")
  args = parser.parse_args(argv)
  out = convert(args.source, args.out, use_ema=not args.no_ema, config=args.config, tokenizer=args.tokenizer)
  print(f"wrote {out}; sample with: python sample.py --checkpoint {out} --prompt '...'")


if __name__ == "__main__":
  main()
