"""The offline localisation task: scikit-learn's digits pasted on cluttered canvases.

Each digit (the same stratified train/val split as the quickstart's, config.data's
val_fraction and split_seed) is upscaled to a random size and aspect, pasted at a random
place on a square canvas of noise and random strokes, and its box is the tight box of its
ink. The canvases are written once, like ImageNet with Kaggle's files:

  <root>/train/<class>/<key>.jpg, <root>/val/<class>/<key>.jpg    the images (RGB JPEG)
  <root>/LOC_train_solution.csv, <root>/LOC_val_solution.csv      their boxes, Kaggle's form

so the classifier reads them as an image folder and localisation joins them with their boxes
through the same code as ImageNet's. A manifest (canvas.json) records the settings; a
folder written with other settings is rebuilt.
"""

from __future__ import annotations

import csv
import logging
import os
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vgg_jax.data import written_once
from vgg_jax.localisation.annotations import CSV_COLUMNS

logger = logging.getLogger(__name__)

TRAIN_DIR, VAL_DIR = "train", "val"
MANIFEST = "canvas.json"
SOLUTION_FILES = {TRAIN_DIR: "LOC_train_solution.csv", VAL_DIR: "LOC_val_solution.csv"}
# The digits' ink is 0-16 (scikit-learn); pixels of the upscaled digit from this grey level
# (0-255) on are its ink, which its box encloses tightly.
INK_LEVEL = 64
# Clutter strokes and blobs are drawn in grey levels up to this, digits' ink reaches 255.
_CLUTTER_MAX_GREY = 170
_CLUTTER_MIN_GREY = 60
_BACKGROUND_MAX_GREY = 40
_MAX_STROKE_WIDTH = 2
# A blob's radius as a fraction of the canvas side, at most.
_BLOB_RADIUS_FRACTION = 0.06


def canvas_settings(data_config: Any, canvas_config: Any) -> dict[str, Any]:
    """The settings a canvas folder is written with (its manifest).

    Args:
      data_config: config.data (val_fraction, split_seed, jpeg_quality).
      canvas_config: config.localisation.canvas.

    Returns:
      A JSON-safe dict.
    """
    c = canvas_config
    return {"size": int(c.size), "digit_min": int(c.digit_min), "digit_max": int(c.digit_max),
            "aspect_jitter": float(c.aspect_jitter), "copies": int(c.copies),
            "strokes": int(c.strokes), "blobs": int(c.blobs), "noise_std": float(c.noise_std),
            "seed": int(c.seed), "max_digits": int(c.max_digits),
            "val_fraction": float(data_config.val_fraction),
            "split_seed": int(data_config.split_seed),
            "jpeg_quality": int(data_config.jpeg_quality)}


def _digits(settings: dict[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """split -> (uint8 digit images [N, 8, 8], labels [N]), the quickstart's split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images / float(digits.images.max()) * 255).astype(np.uint8)
    train, val = train_test_split(np.arange(len(images)), test_size=settings["val_fraction"],
                                  stratify=digits.target, random_state=settings["split_seed"])
    split = {}
    for name, indices in ((TRAIN_DIR, np.sort(train)), (VAL_DIR, np.sort(val))):
        if settings["max_digits"]:
            indices = indices[: settings["max_digits"]]
        split[name] = (images[indices], digits.target[indices])
    return split


def render(digit: np.ndarray, rng: np.random.Generator, settings: dict[str, Any]
           ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """One canvas: a digit at a random size and place over noise and clutter.

    Args:
      digit: uint8 [8, 8] (or any size) grey digit, ink bright.
      rng: this canvas's generator.
      settings: `canvas_settings`.

    Returns:
      (uint8 [size, size] grey canvas, the digit's pixel box (xmin, ymin, xmax, ymax)).
    """
    size = settings["size"]
    canvas = rng.uniform(0, _BACKGROUND_MAX_GREY) + rng.normal(0, settings["noise_std"],
                                                               (size, size))
    clutter = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(clutter)
    for _ in range(settings["strokes"]):
        points = [tuple(float(v) for v in rng.uniform(0, size, 2)) for _ in range(2)]
        draw.line(points, fill=int(rng.integers(_CLUTTER_MIN_GREY, _CLUTTER_MAX_GREY)),
                  width=int(rng.integers(1, _MAX_STROKE_WIDTH + 1)))
    for _ in range(settings["blobs"]):
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(1, _BLOB_RADIUS_FRACTION * size)
        draw.ellipse((x - r, y - r, x + r, y + r),
                     fill=int(rng.integers(_CLUTTER_MIN_GREY, _CLUTTER_MAX_GREY)))
    side = rng.uniform(settings["digit_min"], settings["digit_max"])
    aspect = 1.0 + rng.uniform(-settings["aspect_jitter"], settings["aspect_jitter"])
    width = round(min(side * aspect, size))
    height = round(min(side / aspect, size))
    pasted = np.asarray(Image.fromarray(digit).resize((width, height),
                                                      Image.Resampling.BICUBIC))
    left, top = int(rng.integers(0, size - width + 1)), int(rng.integers(0, size - height + 1))
    canvas = np.maximum(canvas, np.asarray(clutter, np.float64))
    window = canvas[top : top + height, left : left + width]
    canvas[top : top + height, left : left + width] = np.maximum(window, pasted)
    rows, cols = np.nonzero(pasted >= INK_LEVEL)
    box = (left + int(cols.min()), top + int(rows.min()), left + int(cols.max()),
           top + int(rows.max()))
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8), box


def _write(out_dir: str, settings: dict[str, Any]) -> None:
    for split, (digits, labels) in _digits(settings).items():
        copies = settings["copies"] if split == TRAIN_DIR else 1
        for cls in np.unique(labels):
            os.makedirs(os.path.join(out_dir, split, str(cls)), exist_ok=True)
        rows = []
        for n in range(len(digits) * copies):
            digit, label = digits[n % len(digits)], int(labels[n % len(digits)])
            # Every canvas has its own generator: (seed, split, number).
            rng = np.random.default_rng([settings["seed"], split == VAL_DIR, n])
            image, box = render(digit, rng, settings)
            key = f"canvas_{split}_{n:05d}"
            Image.fromarray(image).convert("RGB").save(
                os.path.join(out_dir, split, str(label), f"{key}.jpg"), "JPEG",
                quality=settings["jpeg_quality"])
            rows.append((key, f"{label} {' '.join(str(v) for v in box)}"))
        with open(os.path.join(out_dir, SOLUTION_FILES[split]), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_COLUMNS)
            writer.writerows(rows)


def prepare_canvas(data_config: Any, canvas_config: Any) -> str:
    """Writes the canvas folder once (into config.data.data_dir) and returns its root.

    Built in a temporary directory and renamed into place, so a run killed half-way never
    leaves a partial folder; a folder with other settings is rebuilt.

    Args:
      data_config: config.data (data_dir: the folder; val_fraction, split_seed,
        jpeg_quality).
      canvas_config: config.localisation.canvas.

    Returns:
      The folder's root.
    """
    settings = canvas_settings(data_config, canvas_config)
    root = os.path.abspath(os.path.expanduser(str(data_config.data_dir)))
    if written_once.write_once(root, settings, _write, MANIFEST):
        logger.info("Wrote the digits canvas folder %s.", root)
    return root
