"""Computes the mean RGB of a training split (the paper's only preprocessing, 3.1).

Usage:

  python -m vgg_jax.data.mean_rgb --config=configs/vgg_a.py \
      [--config.data.source=digits] [--max_images=50000] [--threads=8]
  python -m vgg_jax.data.mean_rgb --config.data.source=folder --config.data.data_dir=DIR
  python -m vgg_jax.data.mean_rgb --config=configs/finetune.py --config.data.data_dir=DIR

Every image is decoded, rescaled isotropically to shortest side the test scale Q of the
config's training scale (the training resolution, so the statistic weights images as
training does rather than by their file resolution; --scale sets another) and its pixels
are summed; the result, in 0-255 units, is printed together with the override to pass as
--config.data.mean_rgb. A config that leaves the training scale to the checkpoint it
starts from (configs/finetune.py) gives no Q: each image then counts at its own size,
unless --scale is given. --config defaults to configs/base.py of this checkout.
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from vgg_jax.data import decode, sources, transforms


def _pixel_sums(record: dict[str, Any], scale: int | None) -> tuple[np.ndarray, int]:
    try:
        array = (decode.decode_rescaled(record["image"], scale) if scale
                 else decode.decode_image(record["image"]))
    except decode.DECODE_ERRORS:
        return np.zeros(3), 0
    return array.reshape(-1, 3).sum(0, dtype=np.float64), array.shape[0] * array.shape[1]


def compute_mean_rgb(data_config: Any, max_images: int = 0, threads: int = 1,
                     scale: int | None = None) -> np.ndarray:
    """The mean RGB (0-255) of the training split, over pixels at the eval scale.

    Args:
      data_config: config.data.
      max_images: use this many evenly spaced images (0: all).
      threads: decoding threads.
      scale: the shorter side images are rescaled to; None: the single test scale Q of
        the config's training scale, or, when the config leaves it unset, each image's
        own size.

    Returns:
      float64 [3].

    Raises:
      ValueError: for a negative max_images, or when no image decodes.
    """
    if max_images < 0:
        raise ValueError(f"--max_images={max_images} must be 0 (all images) or more.")
    source = sources.make_source(data_config, str(data_config.train_split))
    count = len(source) if max_images <= 0 else min(max_images, len(source))
    indices = np.linspace(0, len(source) - 1, count).round().astype(int)
    scales = (data_config.get("train_scale_min"), data_config.get("train_scale_max"))
    if scale is None and None not in scales:
        scale = transforms.single_test_scale(*scales)
    if scale is None:
        logging.info("The config leaves the training scale unset (it comes from "
                     "config.init_from): every image counts at its own size (--scale=Q "
                     "rescales them).")
    total, pixels, skipped = np.zeros(3), 0, 0
    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        for sums, n in pool.map(lambda i: _pixel_sums(source[i], scale), indices):
            total += sums
            pixels += n
            skipped += n == 0
    if pixels == 0:
        raise ValueError(f"No decodable image in {source!r}.")
    if skipped:
        logging.warning("Skipped %d undecodable image(s) of %d.", skipped, len(indices))
    return total / pixels


# The recipe of this checkout, the default --config (the library never imports configs/).
_BASE_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "configs", "base.py")


def define_flags() -> None:
    """The command's flags (defined when run, so that importing this module defines none)."""
    config_flags.DEFINE_config_file(
        "config", _BASE_CONFIG, "Config file, e.g. configs/vgg_a.py (default: configs/base.py).")
    flags.DEFINE_integer("scale", 0, "The shorter side images are rescaled to (0: the config's "
                         "single test scale Q, or each image's own size when the config "
                         "leaves the training scale unset).", lower_bound=0)
    flags.DEFINE_integer(
        "max_images", 0, "Use this many evenly spaced training images (0: all of them).")
    flags.DEFINE_integer(
        "threads", 4, "Decoding threads (PIL releases the GIL while decoding and resizing).")


def main(argv: Sequence[str]) -> None:
    """Command line: python -m vgg_jax.data.mean_rgb [--config=FILE] [--max_images=N]."""
    del argv
    f = flags.FLAGS
    try:
        sources.validate_source(f.config.data)
        mean = compute_mean_rgb(f.config.data, f.max_images, f.threads, f.scale or None)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"Error: {error}")
    values = ", ".join(f"{v:.2f}" for v in mean)
    print(f"mean RGB: ({values})")
    print(f'override: --config.data.mean_rgb="({values})"')


if __name__ == "__main__":
    define_flags()
    app.run(main)
