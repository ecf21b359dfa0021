"""Classifies image files with a trained (or converted) checkpoint.

  python -m vgg_jax.predict --checkpoint runs/vgg_d cat.jpg dog.png
  python -m vgg_jax.predict --checkpoint runs/torchvision_vgg16 --protocol dense cat.jpg

The image is rescaled to the checkpoint's test scale (config.data.eval_scale, e.g. 256)
and classified with one of the paper's protocols (default: the centre crop); the top-k
classes are printed with their probabilities, named with ImageNet's class names for a
1000-class net, the class folder names for a net trained on an image folder.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from vgg_jax import eval_plan, evaluate, imagenet_classes, models
from vgg_jax.data import decode, digits

PREDICT_PROTOCOLS = (eval_plan.SINGLE_CROP, eval_plan.DENSE, eval_plan.MULTI_CROP)


def class_names_for(run_config, num_classes: int) -> list[str]:
    """Human-readable class names of a net, or "class <i>" where none are known.

    ImageNet's names for a 1000-class net not trained on a folder, "0" ... "9" for the
    digits, and the training split's class folder names for a folder (when it is still
    there); any list whose length is not `num_classes` is replaced by the generic names.

    Args:
      run_config: the checkpoint's run config (its `data` section is read).
      num_classes: the net's number of classes.

    Returns:
      `num_classes` names, the name of class i at position i.
    """
    names: Sequence[str] | None = None
    data = run_config.get("data", {})
    source = str(data.get("source", ""))
    if num_classes == imagenet_classes.NUM_CLASSES and source != "folder":
        names = imagenet_classes.class_names()
    elif source == "digits" and num_classes == digits.DIGITS_NUM_CLASSES:
        names = [str(i) for i in range(digits.DIGITS_NUM_CLASSES)]
    elif source == "folder" and data.get("data_dir"):
        try:
            from vgg_jax.data import sources

            names = sources.folder_class_names(data.data_dir, str(data.train_split))
        except (ImportError, ValueError, OSError):
            names = None
    if names is None or len(names) != num_classes:
        return [f"class {i}" for i in range(num_classes)]
    return list(names)


def _views(data: bytes, protocol: str, q: int, image_size: int, grid: int,
           dense_size_step: int) -> np.ndarray:
    # The views evaluation makes, the dense one cropped to the same bucket shape.
    width, height = decode.image_size(data)
    shape = eval_plan.dense_shape(height, width, q, image_size, dense_size_step)
    return eval_plan.encoded_image_views(data, protocol, q, image_size, grid, True, shape)


def predict(
    checkpoint_path: str,
    image_paths: Sequence[str],
    top_k: int = 5,
    *,
    step: int | str | None = None,
    protocol: str = eval_plan.SINGLE_CROP,
    scale: int | None = None,
    multi_crop_grid: int = 5,
) -> list[dict[str, Any]]:
    """Top-k classes of each image.

    Args:
      checkpoint_path: a workdir or weight directory (vgg_jax.checkpoint.load_variables).
      image_paths: image files (JPEG, PNG, ... ; grayscale and CMYK are converted to RGB).
      top_k: how many classes to return per image.
      step: checkpoint step (None: best if any, else latest).
      protocol: "single_crop" (default), "dense" (whole image and its flip) or
        "multi_crop" (grid x grid crops and flips).
      scale: test scale Q (None: the checkpoint's config.data.eval_scale).
      multi_crop_grid: side of the multi-crop grid.

    Returns:
      One dict per image: {"path", "predictions": [{"class", "name", "probability"}, ...]}
      best first, or {"path", "error"} for a file that cannot be read.

    Raises:
      ValueError: for an unknown protocol, or a test scale below the net's crop size.
    """
    if protocol not in PREDICT_PROTOCOLS:
        raise ValueError(
            f"Unknown protocol {protocol!r}; use one of {', '.join(PREDICT_PROTOCOLS)}.")
    net, run_config = evaluate.load_net(checkpoint_path, step)
    image_size, num_classes = net.model.image_size, net.model.num_classes
    q = int(scale or run_config.data.get("eval_scale", net.train_scale[0]))
    if q < image_size:
        raise ValueError(f"Test scale {q} is smaller than the net's crop size {image_size}.")
    names = class_names_for(run_config, num_classes)
    dense_size_step = int(run_config.get("eval", {}).get("dense_size_step", models.TOTAL_STRIDE))
    # Multi-crop views come with their flips; dense flips are made on the device.
    flip = protocol == eval_plan.DENSE
    # One image at a time: dense views differ in shape, and a handful of images is cheap.
    fn = jax.jit(lambda variables, views: evaluate.class_probabilities(
        net.model, tuple(net.mean_rgb), tuple(net.std_rgb), flip, variables, views))
    variables = jax.device_put(net.variables)
    k = max(1, min(int(top_k), num_classes))
    results = []
    for path in image_paths:
        try:
            with open(path, "rb") as f:
                views = _views(f.read(), protocol, q, image_size, multi_crop_grid,
                               dense_size_step)
        except decode.DECODE_ERRORS as e:
            results.append({"path": path, "error": f"cannot read image: {e}"})
            continue
        probs = np.asarray(fn(variables, views[None]))[0]
        order = np.argsort(-probs, kind="stable")[:k]
        results.append({"path": path, "predictions": [
            {"class": int(c), "name": names[c], "probability": float(probs[c])} for c in order
        ]})
    return results


def format_predictions(results: Sequence[dict[str, Any]]) -> str:
    """Human-readable lines: each path, then its classes with probabilities.

    Args:
      results: what `predict` returns.

    Returns:
      The lines joined by newlines (no trailing newline); a failed image shows its error.
    """
    lines = []
    for result in results:
        lines.append(result["path"])
        if "error" in result:
            lines.append(f"  error: {result['error']}")
            continue
        for rank, p in enumerate(result["predictions"], 1):
            lines.append(f"  {rank}. {100 * p['probability']:6.2f}%  {p['name']} ({p['class']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command line: python -m vgg_jax.predict --checkpoint DIR IMAGE [IMAGE ...]."""
    parser = argparse.ArgumentParser(
        prog="python -m vgg_jax.predict", description="Classify images with a vgg-jax checkpoint.")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--checkpoint", required=True, help="workdir or weight directory")
    parser.add_argument("--step", default=None, help="step number, 'best' or 'latest'")
    parser.add_argument("--top_k", type=int, default=5)
    parser.add_argument("--protocol", default=eval_plan.SINGLE_CROP, choices=PREDICT_PROTOCOLS)
    parser.add_argument("--scale", type=int, default=None, help="test scale Q (shorter side)")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"--top_k={args.top_k} must be at least 1.")
    if not os.path.exists(args.checkpoint):
        parser.error(f"checkpoint {args.checkpoint} does not exist.")
    try:
        results = predict(args.checkpoint, args.images, args.top_k, step=args.step,
                          protocol=args.protocol, scale=args.scale)
    except ValueError as e:
        sys.exit(f"Prediction failed: {e}")
    print(format_predictions(results))
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
