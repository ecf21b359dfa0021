"""Throughput of the training transform against a torchvision-style PIL reference.

  python benchmarks/input_pipeline.py                      # ImageNet-like JPEGs, 1..2 workers
  python benchmarks/input_pipeline.py --folder=/data/imagenet/train --num-images=2000
  python benchmarks/input_pipeline.py --num-images=16 --max-workers=1   # smoke run, seconds

For each training-scale setting (S = 256, and S uniform in [256, 512]) and each worker
count N in 1..--max-workers, both transforms run in N processes over the same files
(read from disk, decoded, augmented to uint8 crops):

  ours:      vgg_jax.data.transforms.TrainTransform (simplejpeg decode, reduced-scale
             JPEG decoding, crop-window resize, flip, PCA colour shift);
  reference: the usual torchvision recipe with PIL only: decode, resize the whole image to
             shortest side S, random 224 crop, random flip, uint8 array.

It prints images/s in total and per worker process (wall clock), ours / reference, and
images per CPU-second of the worker processes (process_time), which other jobs on a shared
machine disturb far less than the wall-clock figures: on a busy machine compare those
("ours/cpu", "ref/cpu", "cpu ratio"). Then it times
the whole grain pipeline (`train_dataset`, batches of --batch-size) with N workers.
--json writes every figure to a file.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import base
from vgg_jax.data import decode, pipeline, transforms

# ImageNet's typical photo: 500x375, saved at JPEG quality 90.
IMAGE_WIDTH, IMAGE_HEIGHT, JPEG_QUALITY = 500, 375, 90
CROP_SIZE = 224
SCALE_SETTINGS = {"S=256": (256, 256), "S=[256,512]": (256, 512)}
# Low-frequency base grid of the synthetic photos (upsampled) and the noise on top, so the
# files compress like photos (~100 KB at 500x375, q90) rather than like flat colour.
_BASE_GRID = (12, 16)
_NOISE_AMPLITUDE = 20


def write_images(folder: str, count: int, seed: int) -> list[str]:
    """Writes `count` ImageNet-like JPEGs into folder/train/<class>/ and returns their paths.

    Args:
      folder: the image-folder root; images alternate between class0 and class1.
      count: how many JPEGs to write.
      seed: seed of the random pixels.

    Returns:
      The paths written, in order.
    """
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        base_grid = rng.integers(0, 256, (*_BASE_GRID, 3), dtype=np.uint8)
        image = Image.fromarray(base_grid).resize((IMAGE_WIDTH, IMAGE_HEIGHT), Image.BICUBIC)
        noise = rng.integers(
            -_NOISE_AMPLITUDE, _NOISE_AMPLITUDE + 1, (IMAGE_HEIGHT, IMAGE_WIDTH, 3))
        pixels = np.clip(np.asarray(image, np.int16) + noise, 0, 255).astype(np.uint8)
        class_dir = os.path.join(folder, "train", f"class{i % 2}")
        os.makedirs(class_dir, exist_ok=True)
        path = os.path.join(class_dir, f"{i:05d}.JPEG")
        Image.fromarray(pixels).save(path, "JPEG", quality=JPEG_QUALITY)
        paths.append(path)
    return paths


def list_images(folder: str, limit: int) -> list[str]:
    """Up to `limit` image files under `folder` (recursively, sorted).

    Args:
      folder: the directory to walk.
      limit: the most paths returned.

    Returns:
      Paths of .jpg, .jpeg and .png files (any case).
    """
    paths = []
    for directory, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() in (".jpg", ".jpeg", ".png"):
                paths.append(os.path.join(directory, name))
                if len(paths) >= limit:
                    return paths
    return paths


def reference_transform(
    data: bytes, rng: np.random.Generator, scale_range: tuple[int, int]
) -> np.ndarray:
    """torchvision's Resize(S) + RandomCrop(224) + RandomHorizontalFlip, with PIL only.

    Args:
      data: the encoded image.
      rng: draws the scale, the crop and the flip.
      scale_range: (S min, S max), inclusive; S is drawn uniformly.

    Returns:
      A CROP_SIZE x CROP_SIZE x 3 uint8 array.
    """
    image = Image.open(io.BytesIO(data)).convert("RGB")
    scale = int(rng.integers(scale_range[0], scale_range[1] + 1))
    width, height = image.size
    size = decode.rescaled_size(width, height, scale)
    image = image.resize(size, Image.Resampling.BILINEAR)
    left = int(rng.integers(0, size[0] - CROP_SIZE + 1))
    top = int(rng.integers(0, size[1] - CROP_SIZE + 1))
    image = image.crop((left, top, left + CROP_SIZE, top + CROP_SIZE))
    if rng.integers(0, 2):
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(image, dtype=np.uint8)


def _data_config(scale_range: tuple[int, int]) -> Any:
    config = base.get_config().data
    config.image_size = CROP_SIZE
    config.train_scale_min, config.train_scale_max = scale_range
    return config


def _worker(args: tuple[str, list[str], tuple[int, int], int]) -> tuple[int, float, float]:
    """Runs one transform over `paths` in this process; returns (images, wall seconds,
    CPU seconds of this process)."""
    which, paths, scale_range, seed = args
    rng = np.random.default_rng(seed)
    train_transform = transforms.TrainTransform(_data_config(scale_range))
    start, cpu_start = time.perf_counter(), time.process_time()
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        if which == "ours":
            out = train_transform.random_map({"image": data, "label": 0, "name": path}, rng)
            assert out["mask"], path
        else:
            reference_transform(data, rng, scale_range)
    return len(paths), time.perf_counter() - start, time.process_time() - cpu_start


def transform_throughput(
    which: str, paths: list[str], scale_range: tuple[int, int], workers: int, repeats: int
) -> tuple[float, float]:
    """(images/s, images per CPU-second) of `which` transform over `paths` (x repeats) split
    across `workers` processes.

    Args:
      which: "ours" (TrainTransform) or "reference" (`reference_transform`).
      paths: the image files.
      scale_range: (S min, S max) of the training scale.
      workers: number of spawned worker processes.
      repeats: passes over `paths`.

    Returns:
      (images per wall-clock second, bounded by the slowest worker; images per CPU-second
      summed over the workers).
    """
    work = paths * repeats
    chunks = [work[i::workers] for i in range(workers)]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
        # Warm-up: imports and first-call costs in every worker, outside the timing.
        pool.map(_worker, [(which, c[:2], scale_range, i) for i, c in enumerate(chunks)])
        results = pool.map(_worker, [(which, c, scale_range, i) for i, c in enumerate(chunks)])
    images = sum(n for n, _, _ in results)
    # Processes run concurrently: the slowest one bounds the wall time.
    return images / max(s for _, s, _ in results), images / sum(c for _, _, c in results)


def pipeline_throughput(
    folder: str, scale_range: tuple[int, int], workers: int, batch_size: int, num_batches: int
) -> float:
    """Images/s of the full grain training pipeline with `workers` processes (after warm-up).

    Args:
      folder: an image-folder root with a train/ split.
      scale_range: (S min, S max) of the training scale.
      workers: grain worker processes (0: in this process).
      batch_size: global batch size.
      num_batches: batches timed after the first one.

    Returns:
      Images per second over the timed batches.
    """
    config = _data_config(scale_range)
    config.source, config.data_dir, config.num_workers = "folder", folder, workers
    config.eval_split = config.train_split  # The benchmark folder has no validation split.
    iterator = iter(pipeline.train_dataset(config, global_batch_size=batch_size, seed=0))
    next(iterator)  # Worker start-up.
    start = time.perf_counter()
    for _ in range(num_batches):
        next(iterator)
    seconds = time.perf_counter() - start
    del iterator
    return num_batches * batch_size / seconds


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line (see the module docstring); returns the figures it prints."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--folder", default=None, help="benchmark these images (default: write JPEGs)")
    parser.add_argument("--num-images", type=int, default=256, help="images to write or read")
    parser.add_argument("--max-workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=2, help="passes over the images per run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; best kept")
    parser.add_argument("--batch-size", type=int, default=32, help="pipeline batch size")
    parser.add_argument("--pipeline-batches", type=int, default=16, help="timed pipeline batches")
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        if args.folder:
            paths = list_images(args.folder, args.num_images)
            folder = args.folder
        else:
            folder = tmp
            paths = write_images(tmp, args.num_images, seed=0)
        if not paths:
            raise SystemExit(f"No images found under {args.folder}.")
        sizes = [os.path.getsize(p) for p in paths]
        print(
            f"{len(paths)} images, mean file {np.mean(sizes) / 1024:.0f} KiB, cpus "
            f"{os.cpu_count()}, load average at start {os.getloadavg()[0]:.2f}"
        )
        results: dict[str, Any] = {"num_images": len(paths), "cpus": os.cpu_count(), "runs": []}
        header = (
            f"{'setting':<12} {'workers':>7} {'ours img/s':>11} {'per worker':>10} "
            f"{'ref img/s':>10} {'per worker':>10} {'ratio':>6} {'ours/cpu':>9} {'ref/cpu':>8} "
            f"{'cpu ratio':>9}"
        )
        print(header)
        for name, scale_range in SCALE_SETTINGS.items():
            for workers in range(1, args.max_workers + 1):
                # Alternate the two and keep each one's best round, so that load from other
                # programs on a shared machine biases neither side.
                ours = ref = ours_cpu = ref_cpu = 0.0
                for _ in range(args.rounds):
                    timing = (paths, scale_range, workers, args.repeats)
                    wall, cpu = transform_throughput("ours", *timing)
                    ours, ours_cpu = max(ours, wall), max(ours_cpu, cpu)
                    wall, cpu = transform_throughput("reference", *timing)
                    ref, ref_cpu = max(ref, wall), max(ref_cpu, cpu)
                run = {
                    "setting": name,
                    "workers": workers,
                    "ours": ours,
                    "ours_per_worker": ours / workers,
                    "reference": ref,
                    "reference_per_worker": ref / workers,
                    "ratio": ours / ref,
                    "ours_per_cpu_second": ours_cpu,
                    "reference_per_cpu_second": ref_cpu,
                    "cpu_ratio": ours_cpu / ref_cpu,
                }
                results["runs"].append(run)
                print(
                    f"{name:<12} {workers:>7} {ours:>11.1f} {ours / workers:>10.1f} "
                    f"{ref:>10.1f} {ref / workers:>10.1f} {ours / ref:>6.2f} "
                    f"{ours_cpu:>9.1f} {ref_cpu:>8.1f} {ours_cpu / ref_cpu:>9.2f}"
                )
        if not args.folder or os.path.isdir(os.path.join(args.folder, "train")):
            print(f"grain pipeline (train_dataset, batch {args.batch_size}):")
            results["pipeline"] = []
            for name, scale_range in SCALE_SETTINGS.items():
                for workers in range(0, args.max_workers + 1):
                    rate = pipeline_throughput(
                        folder, scale_range, workers, args.batch_size, args.pipeline_batches
                    )
                    results["pipeline"].append(
                        {"setting": name, "workers": workers, "images_per_s": rate})
                    print(f"{name:<12} {workers:>7} {rate:>11.1f} img/s")
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
