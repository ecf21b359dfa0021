"""Computes the mean RGB of a training split (the paper's only preprocessing, 3.1).

Usage:

  python -m vgg_jax.data.mean_rgb --config=configs/vgg_a.py \
      [--config.data.source=digits] [--max_images=50000] [--threads=8]

Every image is decoded, rescaled isotropically to shortest side the test scale Q of the
config's training scale (the training resolution, so the statistic weights images as
training does rather than by their file resolution) and its pixels are summed; the
result, in 0-255 units, is printed together with the override to pass as
--config.data.mean_rgb.
"""

from __future__ import annotations

import concurrent.futures
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from vgg_jax.data import decode, sources, transforms


def _pixel_sums(record: dict[str, Any], scale: int) -> tuple[np.ndarray, int]:
    try:
        array = decode.decode_rescaled(record["image"], scale)
    except decode.DECODE_ERRORS:
        return np.zeros(3), 0
    return array.reshape(-1, 3).sum(0, dtype=np.float64), array.shape[0] * array.shape[1]


def compute_mean_rgb(data_config: Any, max_images: int = 0, threads: int = 1) -> np.ndarray:
    """The mean RGB (0-255) of the training split, over pixels at the eval scale.

    Args:
      data_config: config.data.
      max_images: use this many evenly spaced images (0: all).
      threads: decoding threads.

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
    scale = transforms.single_test_scale(data_config.train_scale_min, data_config.train_scale_max)
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


def define_flags() -> None:
    """The command's flags (defined when run, so that importing this module defines none)."""
    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/vgg_a.py.")
    flags.DEFINE_integer(
        "max_images", 0, "Use this many evenly spaced training images (0: all of them).")
    flags.DEFINE_integer(
        "threads", 4, "Decoding threads (PIL releases the GIL while decoding and resizing).")


def main(argv: Sequence[str]) -> None:
    """Command line: python -m vgg_jax.data.mean_rgb --config=FILE [--max_images=N]."""
    del argv
    f = flags.FLAGS
    if f.config is None:
        raise app.UsageError("Pass --config=configs/<file>.py.")
    try:
        sources.validate_source(f.config.data)
        mean = compute_mean_rgb(f.config.data, f.max_images, f.threads)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"Error: {error}")
    values = ", ".join(f"{v:.2f}" for v in mean)
    print(f"mean RGB: ({values})")
    print(f'override: --config.data.mean_rgb="({values})"')


if __name__ == "__main__":
    define_flags()
    app.run(main)
