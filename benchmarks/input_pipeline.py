"""Input-pipeline throughput per CPU core, and how many cores an accelerator host needs.

    python -m benchmarks.input_pipeline [--num-images 256] [--workers 0,1,2] \\
        [--out benchmarks/results/input_pipeline.json]

Writes its own data into a temporary folder: ``--num-images`` synthetic JPEGs (``--source-size``, default
640x480: smooth gradients plus noise, quality 90, so they decode like photos rather than like pure noise)
and the same images as ArrayRecord shards (``ldm_jax.data.prepare``). Then it reads them through the
project's pipeline (``ldm_jax.data.make_iterator``: grain, decode, resize the shorter side to
``--image-size`` with Pillow's antialiased bicubic, centre crop, batch, scale to [-1, 1]) from
``data.source`` folder and array_record, with 0 (decode in the main process), 1 and 2 worker processes,
and reports images/s and images/s per decoding process. Then the precomputed-latents path: ArrayRecord
records of one ``--latent-size`` x ``--latent-size`` x 4 latent each (float16 and float32) read through
grain the same way (shuffle, decode, batch).

Last, arithmetic on FLOP counts (``--flops``, a ``benchmarks.run --flops-only`` report of SD 1.5 at 512
px): the images/s a TPU v5p host (4 chips) and an 8x H100 box need at 40% MFU, and the cores that takes at
the measured rates. From JPEGs the device also runs the VAE encoder on every image; from latents only the
UNet's training step.
"""

import argparse
import io
import json
import os
import sys
import tempfile
import time
from typing import Any

import grain
import msgpack
import numpy as np
from absl import flags
from array_record.python import array_record_data_source, array_record_module
from PIL import Image

from benchmarks.machine import machine_info, usable_cores
from benchmarks.report import write_json
from ldm_jax.data import default_data_config, make_iterator, prepare_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_FLOPS = os.path.join(ROOT, "benchmarks", "results", "cpu_sd15_512_flops.json")
MFU = 0.40
# (name, chips, dense bf16 FLOP/s per chip): benchmarks/peaks.py's figures.
SYSTEMS: tuple[tuple[str, int, float], ...] = (
    ("TPU v5p host (4 chips)", 4, 459e12),
    ("8x H100 SXM", 8, 989e12),
)


def synthetic_jpeg(rng: np.random.Generator, width: int, height: int, quality: int = 90) -> bytes:
  """A photo-like JPEG: per-channel gradients in random directions plus Gaussian noise."""
  y, x = np.mgrid[0:height, 0:width].astype(np.float32)
  channels = []
  for _ in range(3):
    angle, phase = rng.uniform(0, 2 * np.pi, size=2)
    ramp = (np.cos(angle) * x + np.sin(angle) * y) / max(width, height)
    channels.append(127.5 + 100 * np.sin(2 * np.pi * ramp * rng.uniform(0.5, 3) + phase))
  pixels = np.stack(channels, axis=-1) + rng.normal(0, 12, size=(height, width, 3))
  out = io.BytesIO()
  Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=quality)
  return out.getvalue()


def write_images(folder: str, num: int, width: int, height: int) -> float:
  """Writes ``num`` JPEGs with caption files; returns their mean size in bytes."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(0)
  sizes = []
  for i in range(num):
    data = synthetic_jpeg(rng, width, height)
    sizes.append(len(data))
    with open(os.path.join(folder, f"{i:06d}.jpg"), "wb") as f:
      f.write(data)
    with open(os.path.join(folder, f"{i:06d}.txt"), "w") as f:
      f.write(f"synthetic image {i}")
  return float(np.mean(sizes))


def cpu_seconds() -> float:
  """CPU seconds of this process and of its child processes that are alive (grain's workers), from /proc."""
  total = time.process_time()
  ticks, me = os.sysconf("SC_CLK_TCK"), os.getpid()
  for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
    except OSError:  # ended meanwhile
      continue
    if int(fields[1]) == me:  # its parent is us
      total += (int(fields[11]) + int(fields[12])) / ticks  # user + system time
  return total


def _throughput(iterator, batch: int, batches: int, warmup: int) -> dict[str, float]:
  """Images/s over ``batches`` batches after ``warmup`` untimed ones (worker start-up, first reads), and
  images per CPU-second of all the processes involved: what one core delivers however loaded the machine."""
  for _ in range(warmup):
    next(iterator)
  start, cpu_start = time.perf_counter(), cpu_seconds()
  for _ in range(batches):
    next(iterator)
  wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
  images = batch * batches
  return dict(images_per_s=images / wall, seconds=wall, cpu_s=cpu, images_per_cpu_s=images / max(cpu, 1e-9))


def time_images(source: str, path: str, workers: int, args: argparse.Namespace) -> dict[str, Any]:
  config = default_data_config()
  config.source, config.path, config.image_size, config.num_workers = source, path, args.image_size, workers
  iterator = make_iterator(config, "train", global_batch_size=args.batch, seed=0, process_index=0, process_count=1)
  try:
    row = _throughput(iterator, args.batch, args.batches, args.warmup)
  finally:
    close = getattr(getattr(iterator, "_parent", None), "close", None)  # grain stops its worker processes
    if close is not None:
      close()
  return dict(path=f"jpeg via {source}", dtype="uint8 -> float32", workers=workers,
              images_per_s_per_process=row["images_per_s"] / max(workers, 1), **row)


class _LatentRecords:
  """grain source over ArrayRecord shards of ``{"latent": bytes, "shape", "dtype", "caption"}`` records."""

  def __init__(self, shards: list[str]):
    self._records = array_record_data_source.ArrayRecordDataSource(shards)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict:
    return msgpack.unpackb(self._records[index], raw=False)


def _decode_latent(record: dict) -> dict:
  latent = np.frombuffer(record["latent"], dtype=record["dtype"]).reshape(record["shape"])
  return {"latent": latent.astype(np.float32), "caption": record["caption"]}


def write_latents(folder: str, num: int, size: int, dtype: str) -> list[str]:
  path = os.path.join(folder, f"latents_{dtype}.array_record-00000-of-00001")
  os.makedirs(folder, exist_ok=True)
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  rng = np.random.default_rng(1)
  try:
    for i in range(num):
      latent = rng.normal(size=(size, size, 4)).astype(dtype)
      writer.write(msgpack.packb({"latent": latent.tobytes(), "shape": latent.shape, "dtype": dtype,
                                  "caption": f"synthetic image {i}"}, use_bin_type=True))
  finally:
    writer.close()
  return [path]


def time_latents(shards: list[str], dtype: str, workers: int, args: argparse.Namespace) -> dict[str, Any]:
  dataset = grain.MapDataset.source(_LatentRecords(shards)).shuffle(seed=0).repeat().map(_decode_latent)
  elements = dataset.batch(args.batch, drop_remainder=True).to_iter_dataset(grain.ReadOptions(num_threads=4))
  if workers > 0:
    elements = elements.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  iterator = iter(elements)
  try:
    row = _throughput(iterator, args.batch, args.batches, args.warmup)
  finally:
    if hasattr(iterator, "close"):
      iterator.close()
  return dict(path="latents via array_record", dtype=f"{dtype} -> float32", workers=workers,
              images_per_s_per_process=row["images_per_s"] / max(workers, 1), **row)


def needs(flops_report: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Images/s each system needs at ``MFU``, and the cores that takes at the measured images per CPU-second:
  the best of all rows (``cores_needed``), and the best with worker processes (``cores_needed_workers``,
  which pay for handing images to the main process)."""
  per_image = {r["workload"]: r["flops_per_image"] for r in flops_report["flops"]}
  paths = {
      "jpeg": (per_image["unet_train"] + per_image["vae_encode"], "jpeg via array_record"),
      "latents (float16)": (per_image["unet_train"], "latents via array_record"),
  }
  out = []
  for name, chips, peak in SYSTEMS:
    for path, (flops, measured) in paths.items():
      candidates = [r for r in rows if r["path"] == measured and (path == "jpeg" or r["dtype"].startswith("float16"))]
      per_core = max(r["images_per_cpu_s"] for r in candidates)
      with_workers = max((r["images_per_cpu_s"] for r in candidates if r["workers"] > 0), default=None)
      images_per_s = chips * peak * MFU / flops
      out.append(dict(system=name, path=path, flops_per_image=flops, images_per_s_needed=images_per_s,
                      images_per_s_per_core=per_core, cores_needed=images_per_s / per_core,
                      images_per_s_per_core_workers=with_workers,
                      cores_needed_workers=None if with_workers is None else images_per_s / with_workers))
  return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(prog="python -m benchmarks.input_pipeline", description=__doc__.split("\n\n")[0])
  p.add_argument("--num-images", type=int, default=256, help="synthetic JPEGs written (read repeatedly)")
  p.add_argument("--source-size", default="640x480", help="WIDTHxHEIGHT of the JPEGs")
  p.add_argument("--image-size", type=int, default=512, help="training resolution (resize + centre crop)")
  p.add_argument("--workers", default="0,1,2", help="comma-separated grain worker-process counts")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--batches", type=int, default=30, help="timed batches per configuration")
  p.add_argument("--warmup", type=int, default=3, help="untimed batches first (worker start-up)")
  p.add_argument("--latent-size", type=int, default=64, help="latent side (512 px / 8)")
  p.add_argument("--latent-records", type=int, default=1024)
  p.add_argument("--flops", default=DEFAULT_FLOPS, help="FLOP report of SD 1.5 at 512 px (benchmarks.run --flops-only)")
  p.add_argument("--out", default=None, help="JSON results file")
  args = p.parse_args(argv)
  try:
    width, height = (int(v) for v in args.source_size.lower().split("x"))
    worker_counts = [int(w) for w in args.workers.split(",")]
  except ValueError:
    p.error(f"--source-size must look like 640x480 and --workers like 0,1,2; got {args.source_size!r}, "
            f"{args.workers!r}")
  if not os.path.exists(args.flops):
    p.error(f"--flops {args.flops} does not exist; write it with python -m benchmarks.run --config sd15 "
            "--image-size 512 --batch 1 --flops-only --out FILE")
  with open(args.flops) as f:
    flops_report = json.load(f)
  if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
    flags.FLAGS.mark_as_parsed()

  report = dict(machine=machine_info(sys.argv[1:] if argv is None else argv, module="benchmarks.input_pipeline"),
                settings=dict(vars(args), cores=usable_cores(), mfu=MFU, flops=os.path.relpath(args.flops, ROOT)))
  rows = []
  with tempfile.TemporaryDirectory(prefix="ldm_jax_input_bench_") as scratch:
    images, shards, latents = (os.path.join(scratch, d) for d in ("images", "shards", "latents"))
    report["settings"]["mean_jpeg_bytes"] = write_images(images, args.num_images, width, height)
    prepare_folder(images, shards)
    for workers in worker_counts:
      for source, path in (("folder", images), ("array_record", shards)):
        rows.append(time_images(source, path, workers, args))
        print(_line(rows[-1]), flush=True)
    for dtype in ("float16", "float32"):
      latent_shards = write_latents(latents, args.latent_records, args.latent_size, dtype)
      for workers in worker_counts:
        rows.append(time_latents(latent_shards, dtype, workers, args))
        print(_line(rows[-1]), flush=True)
  report.update(results=rows, needs=needs(flops_report, rows), load_average_end=os.getloadavg())
  print(markdown(report))
  write_json(args.out, report)
  return report


def _line(row: dict[str, Any]) -> str:
  return (f"{row['path']} ({row['dtype']}), {row['workers']} workers: {row['images_per_s']:.1f} images/s, "
          f"{row['images_per_s_per_process']:.1f} per decoding process, {row['images_per_cpu_s']:.1f} per CPU-second")


def markdown(report: dict[str, Any]) -> str:
  lines = ["| path | dtype | worker processes | images/s | images/s per process | images per CPU-second |",
           "|---|---|---|---|---|---|"]
  for r in report["results"]:
    lines.append(f"| {r['path']} | {r['dtype']} | {r['workers']} | {r['images_per_s']:.1f} | "
                 f"{r['images_per_s_per_process']:.1f} | {r['images_per_cpu_s']:.1f} |")
  lines += ["", "| system (40% MFU) | input | GFLOP per image | images/s needed | images per CPU-second | cores "
            "| with workers: images per CPU-second | cores |", "|---|---|---|---|---|---|---|---|"]
  for r in report["needs"]:
    workers = ("- | -" if r["cores_needed_workers"] is None else
               f"{r['images_per_s_per_core_workers']:.0f} | {r['cores_needed_workers']:.1f}")
    lines.append(f"| {r['system']} | {r['path']} | {r['flops_per_image'] / 1e9:.0f} | "
                 f"{r['images_per_s_needed']:.0f} | {r['images_per_s_per_core']:.0f} | {r['cores_needed']:.1f} | "
                 f"{workers} |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
