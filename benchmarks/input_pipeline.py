"""Training input throughput: the transform per core against PIL and TensorFlow recipes,
and how much of it the grain pipeline delivers with N workers.

  python benchmarks/input_pipeline.py                     # crops of real photos, 1..cpus workers
  python benchmarks/input_pipeline.py --data_dir=/data/imagenet --num_images=2000
  python benchmarks/input_pipeline.py --num_images=16 --max_workers=1 --rounds=1  # smoke run

Images: by default --num_images crops of the real photos that scikit-learn and matplotlib
ship (resized to ImageNet's typical 500x375, saved at JPEG quality 90) are written to an
image folder; --data_dir reads an image-folder root instead, through the same folder source
and checks as training (config.data.source=folder, the train split); undecodable files are
left out of the transform timings (training skips them too) and counted. The file
statistics printed first (KiB, bits per pixel, entropy of the luma gradient) show how
photo-like the timed files are.

1. Per core: images per CPU-second of one process, per training-scale setting (S = 256 and
   S uniform in [256, 512]), for
     ours:       vgg_jax.data.transforms.TrainAugmentation (augment_into a batch slot);
     tuned PIL:  Image.draft (DCT scaling), crop the source window, resize only it, flip;
     plain PIL:  torchvision's recipe: decode, resize the whole image to S, crop, flip;
     tf (flax):  flax's ImageNet recipe, when TensorFlow is installed: random distorted box
                 (area 8-100%, aspect 3/4-4/3), tf.image.decode_and_crop_jpeg, bicubic
                 resize to 224, random flip, in tf.data with one thread.
   Rounds are interleaved (load from other programs biases no side) and every figure is
   the range over the rounds.
2. The grain pipeline (`pipeline.train_dataset`, folder source) with N workers: images/s
   (wall) and its efficiency, N workers against N x the single-process transform rate
   of the same run (its best round; meaningful on an idle machine only, and flagged when
   above 100%); CPU efficiency (transform CPU per image over the
   CPU per image of the pipeline's processes, consumer included), which other programs
   on a shared machine disturb far less; and where the rest goes, per image: reading the
   file, the rest of building a batch (epoch order, per-example generators, labels), the
   hand-off of a batch from a worker (grain's fresh shared-memory block for the images,
   the rest pickled), the consuming process.
3. An extrapolation (not a measurement) to 14 workers per accelerator, each on a core of
   its own at the pipeline's images per CPU-second, next to the 4,500 images/s one
   H100/H200 trains VGG at, and to 8 such accelerators (36,000 images/s).

--json writes every figure to a file.
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import pickle
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import grain.python
import numpy as np
import psutil
from absl import app, flags
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.speed import photos
from configs import base
from vgg_jax.data import decode, pipeline, sources, train_stream, transforms

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "data_dir", None,
    "an image-folder root (root/train/<class>/<image>), read as training reads it; "
    "default: write crops of real photos")
flags.DEFINE_integer("num_images", 256, "images to write, or to take from --data_dir")
flags.DEFINE_integer("max_workers", os.cpu_count() or 1, "pipeline worker counts 1..this")
flags.DEFINE_integer("repeats", 2, "passes over the images per transform timing")
flags.DEFINE_integer("rounds", 3, "interleaved rounds; figures are ranges over them")
flags.DEFINE_integer("batch_size", 32, "pipeline batch size")
flags.DEFINE_integer("pipeline_batches", 16, "timed pipeline batches per worker count")
flags.DEFINE_string("json", None, "write the figures to this JSON file")

CROP_SIZE = 224
SCALE_SETTINGS = {"S=256": (256, 256), "S=[256,512]": (256, 512)}
# flax's ImageNet recipe (examples/imagenet/input_pipeline.py): the distorted box.
TF_AREA_RANGE, TF_ASPECT_RANGE, TF_MIN_OBJECT, TF_ATTEMPTS = (0.08, 1.0), (3 / 4, 4 / 3), 0.1, 10
# One H100/H200 trains VGG-16 at about this many images/s (docs/benchmarks.md); an 8-GPU
# host needs 8 times that; 14 decoding cores per accelerator is the extrapolated host.
IMAGES_PER_S_ONE_GPU, GPUS_PER_HOST, WORKERS_PER_GPU = 4_500, 8, 14
# The shortest timed pipeline interval: per-process CPU times advance in clock ticks.
MIN_TIMED_SECONDS = 0.5
# tf.data hands the recipe's crops to Python in batches of this size (one per element
# would add Python's per-element cost, which the recipe does not have in training).
_TF_BATCH = 32


def write_photo_crops(folder: str, count: int, seed: int) -> list[str]:
    """Writes `count` 500x375 quality-90 JPEG crops of real photos into
    folder/train/class{0,1}/ (benchmarks/speed/photos.py) and returns their paths."""
    return photos.write_photo_folder(folder, {"train": count}, seed=seed)


def file_statistics(images: list[bytes]) -> dict[str, float]:
    """Mean file size (KiB), bits per pixel and entropy (bits) of the horizontal luma
    gradient of encoded images: the figures that make JPEG decoding cheap or expensive."""
    bits, pixels, entropies = 0, 0, []
    for data in images:
        grey = np.asarray(Image.open(io.BytesIO(data)).convert("L"), np.int16)
        _, counts = np.unique(np.diff(grey, axis=1), return_counts=True)
        p = counts / counts.sum()
        entropies.append(float(-(p * np.log2(p)).sum()))
        bits, pixels = bits + 8 * len(data), pixels + grey.size
    return {"kib": sum(map(len, images)) / len(images) / 1024, "bits_per_pixel": bits / pixels,
            "gradient_entropy_bits": float(np.mean(entropies))}


# --------------------------------------------------------------------------------------
# The transforms compared per core
# --------------------------------------------------------------------------------------


def tuned_pil_transform(data: bytes, rng: np.random.Generator,
                        scale_range: tuple[int, int]) -> np.ndarray:
    """PIL at its best for this job: DCT-scaled decode (draft), then only the crop's
    source window resized (antialiased bilinear), flipped; a uint8 [224, 224, 3] crop."""
    image = Image.open(io.BytesIO(data))
    scale = int(rng.integers(scale_range[0], scale_range[1] + 1))
    width, height = image.size
    rescaled = decode.rescaled_size(width, height, scale)
    left = int(rng.integers(0, rescaled[0] - CROP_SIZE + 1))
    top = int(rng.integers(0, rescaled[1] - CROP_SIZE + 1))
    image.draft("RGB", rescaled)
    factor = width / image.size[0]
    box = [v / factor for v in decode.source_box(width, height, scale, left, top, CROP_SIZE)]
    crop = image.convert("RGB").resize((CROP_SIZE, CROP_SIZE), decode.RESAMPLE, box=box)
    if rng.integers(0, 2):
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(crop)


def plain_pil_transform(data: bytes, rng: np.random.Generator,
                        scale_range: tuple[int, int]) -> np.ndarray:
    """torchvision's Resize(S) + RandomCrop(224) + RandomHorizontalFlip, with PIL only."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    scale = int(rng.integers(scale_range[0], scale_range[1] + 1))
    size = decode.rescaled_size(*image.size, scale)
    image = image.resize(size, decode.RESAMPLE)
    left = int(rng.integers(0, size[0] - CROP_SIZE + 1))
    top = int(rng.integers(0, size[1] - CROP_SIZE + 1))
    image = image.crop((left, top, left + CROP_SIZE, top + CROP_SIZE))
    if rng.integers(0, 2):
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(image)


def _ours(scale_range: tuple[int, int]) -> Callable[..., Any]:
    config = base.get_config().data
    config.image_size = CROP_SIZE
    config.train_scale_min, config.train_scale_max = scale_range
    transform = transforms.TrainAugmentation(config)
    # As the pipeline runs it: each crop written into its slot of a batch (reused here).
    out = np.empty((CROP_SIZE, CROP_SIZE, 3), np.uint8)
    return lambda data, rng, _: transform.augment_into(data, "benchmark", rng, out)


PYTHON_TRANSFORMS = {"ours": None, "tuned_pil": tuned_pil_transform,
                     "plain_pil": plain_pil_transform}


def time_transform(which: str, images: list[bytes], scale_range: tuple[int, int],
                   repeats: int, seed: int) -> tuple[float, float]:
    """(images per CPU-second, images per wall second) of one transform in this process.

    Runs in a pool process of its own (see `main`), over encoded images held in memory.
    """
    if which == "tf":
        return _time_tf_recipe(images, repeats, seed)
    transform = _ours(scale_range) if which == "ours" else PYTHON_TRANSFORMS[which]
    rng = np.random.default_rng(seed)
    for data in images[:2]:  # First-call costs outside the timing.
        transform(data, rng, scale_range)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(repeats):
        for data in images:
            transform(data, rng, scale_range)
    count = repeats * len(images)
    return count / (time.process_time() - cpu), count / (time.perf_counter() - wall)


def _time_tf_recipe(images: list[bytes], repeats: int, seed: int) -> tuple[float, float]:
    """flax's ImageNet training recipe in tf.data, one thread (see the module docstring)."""
    import tensorflow as tf

    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.random.set_seed(seed)

    def recipe(data: Any) -> Any:
        begin, size, _ = tf.image.sample_distorted_bounding_box(
            tf.image.extract_jpeg_shape(data), tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
            min_object_covered=TF_MIN_OBJECT, aspect_ratio_range=TF_ASPECT_RANGE,
            area_range=TF_AREA_RANGE, max_attempts=TF_ATTEMPTS,
            use_image_if_no_bounding_boxes=True)
        window = tf.stack([begin[0], begin[1], size[0], size[1]])
        image = tf.image.decode_and_crop_jpeg(data, window, channels=3)
        image = tf.image.resize(image, [CROP_SIZE, CROP_SIZE], method="bicubic")
        return tf.image.random_flip_left_right(image)

    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    ds = tf.data.Dataset.from_tensor_slices(images).map(recipe).with_options(options)
    for _ in ds.take(2):  # Tracing and first-call costs outside the timing.
        pass
    ds = ds.repeat(repeats).batch(_TF_BATCH)
    cpu, wall = time.process_time(), time.perf_counter()
    count = sum(int(batch.shape[0]) for batch in ds)
    return count / (time.process_time() - cpu), count / (time.perf_counter() - wall)


def tensorflow_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorflow") is not None


# --------------------------------------------------------------------------------------
# The grain pipeline
# --------------------------------------------------------------------------------------


def folder_config(root: str, scale_range: tuple[int, int], workers: int) -> Any:
    """config.data reading the image folder `root` exactly as training does (its train
    split only: the benchmark needs no validation split)."""
    config = base.get_config().data
    config.source, config.data_dir, config.num_workers = "folder", root, workers
    config.eval_split = config.train_split
    config.image_size = CROP_SIZE
    config.train_scale_min, config.train_scale_max = scale_range
    return config


def _cpu_seconds(process: psutil.Process) -> float:
    """CPU seconds used so far by `process` and its live children (grain's workers)."""
    total = sum(process.cpu_times()[:2])
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):  # A worker that just exited.
            total += sum(child.cpu_times()[:2])
    return total


def pipeline_rate(root: str, scale_range: tuple[int, int], workers: int, batch_size: int,
                  num_batches: int) -> dict[str, float]:
    """Images/s of `pipeline.train_dataset` with `workers` processes (after start-up), CPU
    seconds per image of all its processes, and the consuming process's share of them."""
    config = folder_config(root, scale_range, workers)
    iterator = iter(pipeline.train_dataset(config, global_batch_size=batch_size, seed=0))
    # Start-up, then drain what the workers buffered meanwhile (a thread's buffer and the
    # hand-off queue per worker): from then on every timed batch is produced in the timed
    # interval, and the CPU counted is the CPU of the batches consumed.
    for _ in range(1 + 2 * int(config.prefetch_buffer_size) * max(1, workers)):
        next(iterator)
    me = psutil.Process()
    cpu, own_cpu, start = _cpu_seconds(me), time.process_time(), time.perf_counter()
    # At least num_batches, and long enough for the kernel's CPU clocks (10 ms ticks).
    timed = 0
    while timed < num_batches or time.perf_counter() - start < MIN_TIMED_SECONDS:
        next(iterator)
        timed += 1
    wall, images = time.perf_counter() - start, timed * batch_size
    result = {"images_per_s": images / wall, "cpu_ms_per_image": 1e3 * (_cpu_seconds(me) - cpu)
              / images, "consumer_ms_per_image": 1e3 * (time.process_time() - own_cpu) / images}
    del iterator
    return result


def overhead_breakdown(root: str, scale_range: tuple[int, int], batch_size: int,
                       count: int) -> dict[str, float]:
    """CPU ms per image of each part of the training stream, in this process, no workers:
    reading the file, the transform (into a batch slot, as the pipeline runs it), the rest
    of building a batch (epoch order, per-example generators, labels, notes), and the
    hand-off of a worker's batch as grain makes it (the images copied into a fresh
    shared-memory block, whose pages fault in at first touch, the rest pickled, the block
    opened, read and freed on the consuming side: both sides, here in one process)."""
    config = folder_config(root, scale_range, 0)
    source = sources.make_source(config, str(config.train_split))
    transform = transforms.TrainAugmentation(config)
    records = [source[i % len(source)] for i in range(count)]
    out = np.empty((CROP_SIZE, CROP_SIZE, 3), np.uint8)
    rng = np.random.default_rng(0)
    num_batches = max(1, count // batch_size)
    images = num_batches * batch_size
    stream = train_stream.TrainBatches(
        source, transform, batch_size=batch_size, shuffle_seed=0, augment_seed=1,
        process_index=0, process_count=1)

    def ms(work: Callable[[], Any], images: int = count) -> float:
        start = time.process_time()
        work()
        return 1e3 * (time.process_time() - start) / images

    def batches() -> None:
        for b in range(num_batches):
            stream[b]

    built = [stream[b] for b in range(num_batches)]  # First-use costs outside the timing.

    def hand_over() -> None:
        for batch in built:
            block = grain.python.SharedMemoryArray(batch["image"].shape, batch["image"].dtype)
            block[...] = batch["image"]
            received = pickle.loads(pickle.dumps({**batch, "image": block}))
            np.array(received["image"])  # the consumer reads every byte (a device transfer)
            received["image"].unlink_on_del()
            del block, received

    read = ms(lambda: [source[i % len(source)] for i in range(count)])
    transform_ms = ms(lambda: [transform.augment_into(r["image"], r["name"], rng, out)
                               for r in records])
    return {"read_ms": read, "transform_ms": transform_ms,
            "batch_assembly_ms": ms(batches, images) - read - transform_ms,
            "handoff_ms": ms(hand_over, images)}


# --------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------


def load_images(root: str, limit: int) -> tuple[list[bytes], list[str]]:
    """Up to `limit` decodable training images of the folder, evenly spaced over the split
    (its classes in order), read through the folder source; and the undecodable ones'
    names, which training skips too."""
    config = folder_config(root, SCALE_SETTINGS["S=256"], 0)
    source = sources.make_source(config, str(config.train_split))
    images, undecodable = [], []
    for index in np.linspace(0, len(source) - 1, min(limit, len(source))).round().astype(int):
        record = source[int(index)]
        try:
            decode.decode_image(record["image"])
        except decode.DECODE_ERRORS:
            undecodable.append(record["name"])
            continue
        images.append(record["image"])
    return images, undecodable


def _span(values: list[float]) -> str:
    return f"{min(values):.0f}-{max(values):.0f}" if len(values) > 1 else f"{values[0]:.0f}"


def per_core_section(images: list[bytes], kinds: list[str]) -> dict[str, dict[str, list]]:
    """Interleaved rounds of every transform kind, one spawned process per kind (warm)."""
    ctx = multiprocessing.get_context("spawn")
    pools = {kind: ctx.Pool(1) for kind in kinds}
    figures: dict[str, dict[str, list]] = {
        name: {kind: [] for kind in (*kinds, *(f"{k}_wall" for k in kinds))}
        for name in SCALE_SETTINGS}
    try:
        for round_index in range(FLAGS.rounds):
            for name, scale_range in SCALE_SETTINGS.items():
                for kind in kinds:
                    cpu, wall = pools[kind].apply(
                        time_transform, (kind, images, scale_range, FLAGS.repeats, round_index))
                    figures[name][kind].append(cpu)
                    figures[name][f"{kind}_wall"].append(wall)
    finally:
        for pool in pools.values():
            pool.terminate()
    return figures


def pipeline_section(root: str, ours_wall: dict[str, list[float]],
                     ours_cpu: dict[str, list[float]]) -> list[dict[str, Any]]:
    """Pipeline rates and efficiencies for 1..max_workers workers, per setting."""
    runs = []
    for name, scale_range in SCALE_SETTINGS.items():
        for workers in range(1, FLAGS.max_workers + 1):
            rates = [pipeline_rate(root, scale_range, workers, FLAGS.batch_size,
                                   FLAGS.pipeline_batches) for _ in range(FLAGS.rounds)]
            best_transform = max(ours_wall[name])
            run = {
                "setting": name, "workers": workers,
                "images_per_s": [r["images_per_s"] for r in rates],
                "efficiency": [r["images_per_s"] / (workers * best_transform) for r in rates],
                "cpu_efficiency": [1e3 / max(ours_cpu[name]) / r["cpu_ms_per_image"]
                                   for r in rates],
                "consumer_ms_per_image": [r["consumer_ms_per_image"] for r in rates],
            }
            runs.append(run)
            print(f"{name:<12} {workers:>7} {_span(run['images_per_s']):>13} "
                  f"{min(run['efficiency']):>6.0%}-{max(run['efficiency']):<4.0%} "
                  f"{min(run['cpu_efficiency']):>6.0%}-{max(run['cpu_efficiency']):<4.0%} "
                  f"{np.median(run['consumer_ms_per_image']):>9.3f}")
    return runs


def main(argv: list[str]) -> None:
    del argv
    with tempfile.TemporaryDirectory() as tmp:
        root = FLAGS.data_dir or tmp
        if FLAGS.data_dir is None:
            write_photo_crops(tmp, FLAGS.num_images, seed=0)
        try:
            sources.validate_source(folder_config(root, SCALE_SETTINGS["S=256"], 0))
        except ValueError as e:
            sys.exit(f"--data_dir: {e}")
        images, undecodable = load_images(root, FLAGS.num_images)
        if not images:
            sys.exit(f"--data_dir: no decodable training image under {root!r}.")
        results = run_all(root, images, undecodable)
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(results, f, indent=1)


def run_all(root: str, images: list[bytes], undecodable: list[str]) -> dict[str, Any]:
    """Prints and returns every section's figures (see the module docstring)."""
    stats = file_statistics(images)
    print(f"{len(images)} images ({len(undecodable)} undecodable left out, as training skips "
          f"them), {stats['kib']:.0f} KiB, {stats['bits_per_pixel']:.2f} bits/pixel, luma "
          f"gradient entropy {stats['gradient_entropy_bits']:.2f} bits; cpus {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    kinds = ["ours", "tuned_pil", "plain_pil"] + (["tf"] if tensorflow_installed() else [])
    figures = per_core_section(images, kinds)
    print("per core, images per CPU-second of one process (range over rounds):")
    print(f"{'setting':<12} " + " ".join(f"{k:>11}" for k in kinds)
          + f" {'ours/tuned':>11}" + (f" {'ours/tf':>9}" if "tf" in kinds else ""))
    for name, fig in figures.items():
        ratios = [o / t for o, t in zip(fig["ours"], fig["tuned_pil"])]
        line = f"{name:<12} " + " ".join(f"{_span(fig[k]):>11}" for k in kinds)
        line += f" {min(ratios):>5.2f}-{max(ratios):<5.2f}"
        if "tf" in kinds:
            tf_ratio = [o / t for o, t in zip(fig["ours"], fig["tf"])]
            line += f" {min(tf_ratio):>4.2f}-{max(tf_ratio):<4.2f}"
        print(line)
    breakdown = {name: overhead_breakdown(root, scale_range, FLAGS.batch_size,
                                          max(FLAGS.batch_size, len(images)))
                 for name, scale_range in SCALE_SETTINGS.items()}
    print("CPU ms per image, in one process: " + "; ".join(
        f"{name}: " + ", ".join(f"{k[:-3]} {v:.3f}" for k, v in b.items())
        for name, b in breakdown.items()))
    print(f"grain pipeline (train_dataset, batch {FLAGS.batch_size}); efficiency = images/s "
          "over workers x the best single-process transform rate:")
    print(f"{'setting':<12} {'workers':>7} {'images/s':>13} {'efficiency':>11} "
          f"{'cpu effic.':>11} {'consumer ms/img':>9}")
    ours_wall = {name: fig["ours_wall"] for name, fig in figures.items()}
    ours_cpu = {name: fig["ours"] for name, fig in figures.items()}
    runs = pipeline_section(root, ours_wall, ours_cpu)
    if any(max(run["efficiency"]) > 1 for run in runs):
        print("A wall efficiency above 100% means the single-process transform's wall rate "
              "was measured while other programs held its core: on a shared machine read "
              "the CPU efficiency instead.")
    extrapolation = print_extrapolation(runs, ours_cpu)
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    return {"num_images": len(images), "undecodable": undecodable, "files": stats,
            "cpus": os.cpu_count(), "per_core": figures, "breakdown": breakdown,
            "pipeline": runs, "extrapolation": extrapolation}


def print_extrapolation(runs: list[dict[str, Any]],
                        ours_cpu: dict[str, list[float]]) -> dict[str, float]:
    """Per setting: WORKERS_PER_GPU workers, each on a core of its own, at the pipeline's
    images per CPU-second (the best transform rate times the best CPU efficiency at the
    largest worker count, which counts the consuming process too). CPU-based, since the
    wall-clock rate of a shared machine says nothing about a dedicated host."""
    out = {}
    for name in SCALE_SETTINGS:
        run = [r for r in runs if r["setting"] == name][-1]
        per_worker = max(ours_cpu[name]) * max(run["cpu_efficiency"])
        out[name] = WORKERS_PER_GPU * per_worker
        print(f"extrapolation, not measured ({name}): {WORKERS_PER_GPU} workers x "
              f"{per_worker:.0f} images per CPU-second (transform x CPU efficiency at "
              f"{run['workers']} workers) = {out[name]:,.0f} images/s, one H100/H200 needs "
              f"{IMAGES_PER_S_ONE_GPU:,}; {GPUS_PER_HOST} x {WORKERS_PER_GPU} workers = "
              f"{GPUS_PER_HOST * out[name]:,.0f}, an 8-GPU host needs "
              f"{GPUS_PER_HOST * IMAGES_PER_S_ONE_GPU:,}")
    return out


if __name__ == "__main__":
    app.run(main)
