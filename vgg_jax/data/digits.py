"""scikit-learn's handwritten digits, written once as an image folder (source "digits").

The 1,797 8x8 digits ship inside scikit-learn, so the quickstart needs no download. They
are written on first use as JPEG files in the ImageNet-style layout
<cache_dir>/digits/{train,val}/<class>/<index>.jpg and then read like any image folder,
by `sources.FolderSource`, through the same pipeline as ImageNet. A manifest (digits.json)
records the settings the folder was written with; a folder with other settings is rebuilt.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from vgg_jax.data import written_once

logger = logging.getLogger(__name__)

# Directory names of the digits folder (the ImageNet-style train/val layout) under
# config.data.cache_dir, and the manifest file written into it.
DIGITS_DIRNAME = "digits"
DIGITS_TRAIN_DIR = "train"
DIGITS_VAL_DIR = "val"
DIGITS_MANIFEST = "digits.json"
# The ten digits 0-9; class i is the folder named str(i).
DIGITS_NUM_CLASSES = 10


def _digits_settings(data_config: Any) -> dict[str, Any]:
    return {
        "image_size": int(data_config.digits_image_size),
        "jpeg_quality": int(data_config.jpeg_quality),
        "val_fraction": float(data_config.val_fraction),
        "split_seed": int(data_config.split_seed),
    }


def _write_digits(out_dir: str, settings: dict[str, Any]) -> None:
    """Writes the scikit-learn digits as JPEGs into out_dir/{train,val}/<class>/."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Pixel values are ink counts 0..16; spread them over the 8-bit range.
    max_value = float(digits.images.max())
    images = np.round(digits.images / max_value * 255).astype(np.uint8)
    indices = np.arange(len(images))
    train_idx, val_idx = train_test_split(
        indices,
        test_size=settings["val_fraction"],
        stratify=digits.target,
        random_state=settings["split_seed"],
    )
    size = (settings["image_size"], settings["image_size"])
    for split_dir, split_indices in ((DIGITS_TRAIN_DIR, train_idx), (DIGITS_VAL_DIR, val_idx)):
        for cls in range(DIGITS_NUM_CLASSES):
            os.makedirs(os.path.join(out_dir, split_dir, str(cls)), exist_ok=True)
        for i in sorted(split_indices):
            image = Image.fromarray(images[i], mode="L").resize(size, Image.Resampling.BICUBIC)
            path = os.path.join(out_dir, split_dir, str(digits.target[i]), f"{i:04d}.jpg")
            image.convert("RGB").save(path, "JPEG", quality=settings["jpeg_quality"])


def prepare_digits(data_config: Any) -> str:
    """Writes scikit-learn's digits once as an image folder and returns its root.

    The folder is <cache_dir>/digits/{train,val}/<class>/<index>.jpg (8x8 digits upscaled
    bicubically to `digits_image_size`, RGB JPEG of quality `jpeg_quality`, a stratified
    `val_fraction` split seeded by `split_seed`). It is built in a temporary directory and
    renamed into place, so a run killed half-way never leaves a partial folder; later runs
    (and other processes) reuse it. If the settings changed, it is rebuilt.

    Args:
      data_config: config.data.

    Returns:
      The folder root, to be read with `sources.FolderSource`.
    """
    settings = _digits_settings(data_config)
    cache_dir = os.path.expanduser(str(data_config.cache_dir))
    root = os.path.join(cache_dir, DIGITS_DIRNAME)
    if written_once.write_once(root, settings, _write_digits, DIGITS_MANIFEST):
        logger.info("Wrote the digits image folder %s.", root)
    return root
