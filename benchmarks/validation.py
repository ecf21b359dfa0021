"""Validation inside training, timed per image: the pass every epoch runs over the split.

  python benchmarks/validation.py                                   # both cases, 3 repeats
  python benchmarks/validation.py --cases=photos --photos=1000 --json=validation.json

Times exactly what the training loop calls after an epoch, `loop.validation_fn(model,
config, mesh)(variables)`: the single-crop view at the paper's single test scale Q (from the
training scale S) decoded by the configured decoding threads, the jitted forward pass with
the metric sums on the mesh, and the sums fetched at the end. The first call (planning and
compilation) is reported on its own; then --repeats calls are timed and their median and
best milliseconds per image printed, in wall time and in this process's CPU time (all its
threads: decoding and XLA's), which other programs on a shared machine disturb far less.

Cases:
  quickstart  configs/quickstart.py as it trains (width/8 net A, the digits' validation
              split, 360 8x8 JPEGs rescaled to Q=36, 32x32 crops).
  photos      an image folder of --photos smooth random 256x341 JPEGs (vgg_jax.data.testing),
              Q=256 and 224x224 crops, with a width/8 net A (on a CPU the full-width net
              would time the convolutions, not validation's own machinery).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import base, quickstart
from vgg_jax.data import pipeline, testing
from vgg_jax.models import create_model_from_config
from vgg_jax.runtime import parallel
from vgg_jax.training import loop

_CASES = flags.DEFINE_list("cases", ["quickstart", "photos"], "Which cases to time.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed validation passes per case.", lower_bound=1)
_PHOTOS = flags.DEFINE_integer("photos", 500, "Images in the generated photo folder.",
                               lower_bound=1)
_WORKERS = flags.DEFINE_integer("num_workers", None, "config.data.num_workers (decoding "
                                "threads of validation); default: the case's config.")
_JSON = flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")

# The generated photos: ImageNet's typical 4:3 shape at the paper's smallest test scale.
_PHOTO_SHAPE = (256, 341)
_PHOTO_CLASSES = 10


def quickstart_config():
    """The quickstart's config as it trains."""
    return quickstart.get_config()


def photos_config(root: str, num_images: int):
    """A 224-pixel folder run: writes `num_images` JPEGs under root/val (and one train image
    per class, which the folder source requires)."""
    per_class = max(1, num_images // _PHOTO_CLASSES)
    classes = tuple(f"c{i}" for i in range(_PHOTO_CLASSES))
    testing.write_folder(root, {"train": 1, "val": per_class}, classes=classes,
                         size=_PHOTO_SHAPE)
    config = base.get_config()
    config.model.num_classes = _PHOTO_CLASSES
    config.model.width_divisor, config.model.fc_features = 8, 256
    config.model.compute_dtype = "float32"
    config.data.source, config.data.data_dir = "folder", root
    config.data.train_split, config.data.eval_split = "train", "val"
    config.data.num_workers = 2
    return config


def time_validation(config, repeats: int) -> dict[str, float]:
    """Times training's validation of a freshly initialised net.

    Args:
      config: the run config (model, data, eval batch size).
      repeats: timed passes.

    Returns:
      {"images", "first_s" (planning + compilation + one pass), "median_ms_per_image",
       "best_ms_per_image", "median_cpu_ms_per_image", "best_cpu_ms_per_image" (CPU time of
       all this process's threads), "top1_error"}.
    """
    mesh = parallel.create_mesh()
    model = create_model_from_config(config)
    size = config.data.image_size
    variables = jax.jit(lambda key: model.init(key, jnp.zeros((1, size, size, 3))),
                        out_shardings=parallel.replicated(mesh))(jax.random.key(0))
    validate = loop.validation_fn(model, config, mesh)
    images = pipeline.num_examples(config.data, config.data.eval_split)
    start = time.perf_counter()
    metrics = validate(variables)
    first = time.perf_counter() - start
    seconds, cpu_seconds = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        validate(variables)
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)
    return {"images": images, "first_s": first,
            "median_ms_per_image": 1e3 * statistics.median(seconds) / images,
            "best_ms_per_image": 1e3 * min(seconds) / images,
            "median_cpu_ms_per_image": 1e3 * statistics.median(cpu_seconds) / images,
            "best_cpu_ms_per_image": 1e3 * min(cpu_seconds) / images,
            "top1_error": float(metrics["val/top1_error"])}


def main(argv) -> None:
    del argv
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in _CASES.value:
            if case == "quickstart":
                config = quickstart_config()
            elif case == "photos":
                config = photos_config(os.path.join(tmp, "photos"), _PHOTOS.value)
            else:
                sys.exit(f"--cases names {case!r}; use quickstart and/or photos.")
            if _WORKERS.value is not None:
                config.data.num_workers = _WORKERS.value
            figures[case] = time_validation(config, _REPEATS.value)
            f = figures[case]
            print(f"{case}: {f['images']} images, first pass {f['first_s']:.2f} s, then "
                  f"{f['median_ms_per_image']:.3f} ms/image median, {f['best_ms_per_image']:.3f} "
                  f"best; CPU {f['median_cpu_ms_per_image']:.3f} ms/image median, "
                  f"{f['best_cpu_ms_per_image']:.3f} best, over {_REPEATS.value} passes "
                  f"({jax.devices()[0].platform}, {config.data.num_workers} decoding threads)",
                  flush=True)
    if _JSON.value:
        with open(_JSON.value, "w") as out:
            json.dump(figures, out, indent=1)


if __name__ == "__main__":
    app.run(main)
