"""Classifies image files with any weights: a run, a weight file, a hub model.

  python -m vgg_jax.predict --weights=vgg16 cat.jpg dog.png      # torchvision's, from the hub
  python -m vgg_jax.predict --weights=runs/vgg_d --protocol=dense cat.jpg
  python -m vgg_jax.predict --weights=vgg16.safetensors cat.jpg  # (--workdir=DIR still works)
  python -m vgg_jax.predict --weights=runs/loc --draw_boxes=boxes/ digit.jpg  # a box net

The image is rescaled to the checkpoint's single test scale (Q = S, e.g. 256)
and classified with one of the paper's protocols (default: the centre crop), with exactly
the views and flips evaluation makes under the checkpoint's config.eval (its flip, grid and
dense_size_step); the top-k classes are printed with their probabilities, named with
ImageNet's class names for a 1000-class net, the class folder names for a net trained on an
image folder.

With --draw_boxes=DIR and a box net's workdir (localisation, the paper's Appendix A), each
image's top-5 guesses of protocol 2 (class, probability, box; ranked by the classification
net the box net started from) are printed and drawn into DIR/<image name>_boxes.png.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import app, flags

from vgg_jax.data import decode, transforms
from vgg_jax.data.class_names import class_names_for
from vgg_jax.evaluation import protocols
from vgg_jax.evaluation.run import load_net
from vgg_jax.localisation import drawing
from vgg_jax.localisation.image import localise_image
from vgg_jax.localisation.run import classifier_path, load_box_net
from vgg_jax.runtime import console


def _views(data: bytes, protocol: protocols.Protocol, component: str, image_size: int
           ) -> np.ndarray:
    # The views evaluation makes, the dense one cropped to the same bucket shape.
    q = protocol.scales[0]
    width, height = decode.image_size(data)
    shape = transforms.dense_shape(height, width, q, image_size, protocol.dense_size_step)
    return transforms.image_views(data, component, q, image_size, protocol.grid,
                                  protocol.flip, shape)


def predict(
    weights: str,
    image_paths: Sequence[str],
    top_k: int = 5,
    *,
    step: int | str | None = None,
    protocol: str = protocols.SINGLE_CROP,
    scale: int | None = None,
) -> list[dict[str, Any]]:
    """Top-k classes of each image.

    Args:
      weights: any weights spec (vgg_jax.weights.specs): a workdir or weight directory
        (DIR[@STEP]), a .safetensors/.npz/.pth/.caffemodel file, hf-hub:ORG/NAME or a
        shorthand such as vgg16.
      image_paths: image files (JPEG, PNG, ... ; grayscale and CMYK are converted to RGB).
      top_k: how many classes to return per image.
      step: a workdir's checkpoint step (None: best if any, else latest).
      protocol: one of protocols.PROTOCOLS; its flips, grid and dense bucket step are the
        checkpoint's config.eval ones, as in evaluation.
      scale: test scale Q (None: the paper's single test scale of the net's training scale).

    Returns:
      One dict per image: {"path", "predictions": [{"class", "name", "probability"}, ...]}
      best first, or {"path", "error"} for a file that cannot be read.

    Raises:
      ValueError: for an unknown protocol, or a test scale below the net's crop size.
    """
    net, run_config = load_net(weights, step)
    image_size, num_classes = net.model.image_size, net.model.num_classes
    q = int(scale or transforms.single_test_scale(*net.train_scale))
    if q < image_size:
        raise ValueError(f"Test scale {q} is smaller than the net's crop size {image_size}.")
    settings = dataclasses.replace(
        protocols.Protocol.from_config(run_config.get("eval", {}), (q,)), name=protocol)
    names = class_names_for(run_config, num_classes)
    # One image at a time: dense views differ in shape, and a handful of images is cheap.
    functions = {c: jax.jit(functools.partial(
        protocols.class_probabilities, net.model, tuple(net.mean_rgb), tuple(net.std_rgb),
        settings.device_flip(c))) for c in settings.components}
    variables = jax.device_put(net.variables)
    k = max(1, min(int(top_k), num_classes))
    results = []
    for path in image_paths:
        try:
            with open(path, "rb") as f:
                data = f.read()
            views = {c: _views(data, settings, c, image_size) for c in settings.components}
        except decode.DECODE_ERRORS as e:
            results.append({"path": path, "error": f"cannot read image: {e}"})
            continue
        # Components average with equal weights, as in evaluation.
        probs = np.mean([np.asarray(functions[c](variables, v[None]))[0]
                         for c, v in views.items()], axis=0)
        order = np.argsort(-probs, kind="stable")[:k]
        results.append({"path": path, "predictions": [
            {"class": int(c), "name": names[c], "probability": float(probs[c])} for c in order
        ]})
    return results


def localise(workdir: str, image_paths: Sequence[str], out_dir: str, top_k: int = 5, *,
             step: int | str | None = None, scale: int | None = None) -> list[dict[str, Any]]:
    """A box net's top guesses for each image (protocol 2), drawn into image files.

    Args:
      workdir: a box net's run directory.
      image_paths: image files.
      out_dir: where the drawn images go (created): <out_dir>/<image name>_boxes.png.
      top_k: how many of the (up to 5) guesses to return and draw.
      step: the box net's checkpoint step (None: best if any, else latest).
      scale: one test scale Q (None: the run's config.eval.scales, else Q = S).

    Returns:
      One dict per image: {"path", "drawn", "guesses": [{"class", "name", "probability",
      "box": [xmin, ymin, xmax, ymax] pixels, inclusive]}, ...]} best first, or {"path",
      "error"} for a file that cannot be read.

    Raises:
      ValueError: for a workdir that holds no box net, or no classifier to rank with.
    """
    box_net, run_config = load_box_net(workdir, step)
    classifier, classifier_run = load_net(classifier_path(run_config, run_config))
    # On the device once, not with every image's calls (the nets load as host arrays).
    box_net = dataclasses.replace(box_net, net=dataclasses.replace(
        box_net.net, variables=jax.device_put(box_net.net.variables)))
    classifier = dataclasses.replace(classifier, variables=jax.device_put(classifier.variables))
    scales = ((int(scale),) if scale else tuple(int(q) for q in run_config.eval.get("scales", ()))
              or (transforms.single_test_scale(*box_net.net.train_scale),))
    names = class_names_for(classifier_run, classifier.model.num_classes)
    os.makedirs(out_dir, exist_ok=True)
    results = []
    for path in image_paths:
        try:
            with open(path, "rb") as f:
                data = f.read()
            guesses = localise_image(
                data, [box_net], classifier, scales,
                classifier_flip=bool(classifier_run.eval.get("flip", True)),
                dense_size_step=int(run_config.eval.get("dense_size_step", 32)),
                min_iou=float(run_config.localisation.merge_min_iou))
        except decode.DECODE_ERRORS as e:
            results.append({"path": path, "error": f"cannot read image: {e}"})
            continue
        guesses = guesses[: max(1, int(top_k))]
        stem = os.path.splitext(os.path.basename(path))[0]
        drawn = drawing.draw_guesses(data, guesses, names,
                                     os.path.join(out_dir, f"{stem}_boxes.png"))
        results.append({"path": path, "drawn": drawn, "guesses": [
            {"class": g.label, "name": names[g.label], "probability": g.probability,
             "box": [round(v, 1) for v in g.box]} for g in guesses]})
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
        for rank, p in enumerate(result.get("predictions") or result["guesses"], 1):
            box = f"  box {p['box']}" if "box" in p else ""
            lines.append(f"  {rank}. {100 * p['probability']:6.2f}%  {p['name']} ({p['class']})"
                         f"{box}")
        if "drawn" in result:
            lines.append(f"  drawn: {result['drawn']}")
    return "\n".join(lines)


def define_flags() -> None:
    """The command's flags (defined when run, so that importing this module defines none)."""
    flags.DEFINE_string("weights", None, "The net: any weights spec (vgg16 ... vgg19_bn, "
                        "hf-hub:ORG/NAME[@REVISION], a .safetensors, .npz, .pth or .caffemodel "
                        "file, a run's DIR[@STEP]).")
    flags.DEFINE_string("workdir", None, "A run or weight directory (the same as --weights).")
    flags.DEFINE_string("step", None, "Checkpoint step: a number, 'best' or 'latest' "
                        "(default: best if any, else latest).")
    flags.DEFINE_integer("top_k", 5, "Classes to print per image.", lower_bound=1)
    flags.DEFINE_enum("protocol", protocols.SINGLE_CROP, list(protocols.PROTOCOLS),
                      "Test protocol (paper 3.2); flips and grid as the checkpoint's config.eval.")
    flags.DEFINE_integer("scale", None, "Test scale Q, the rescaled shorter side "
                         "(default: the paper's single test scale of the net's training scale S).")
    flags.DEFINE_string("json", None, "Also write the predictions to this JSON file.")
    flags.DEFINE_string("draw_boxes", None, "Output folder DIR: with a box net (localisation) "
                        "as --weights or --workdir, draw each image's top --top_k guesses "
                        "(class, box) into DIR/<image>_boxes.png.")


def main(argv: Sequence[str]) -> None:
    """Command line: python -m vgg_jax.predict --weights=SPEC IMAGE [IMAGE ...]."""
    console.quiet_library_logs()
    f, images = flags.FLAGS, list(argv[1:])
    if bool(f.weights) == bool(f.workdir):
        sys.exit("Pass the net as --weights=SPEC (vgg16, hf-hub:ORG/NAME, a weight file or a "
                 "run's directory), or a run's directory as --workdir; one of them.")
    if not images:
        sys.exit("Name at least one image file after the flags.")
    try:
        if f.draw_boxes:
            results = localise(f.weights or f.workdir, images, f.draw_boxes, f.top_k,
                               step=f.step, scale=f.scale)
        else:
            results = predict(f.weights or f.workdir, images, f.top_k, step=f.step,
                              protocol=f.protocol, scale=f.scale)
    except ValueError as e:
        sys.exit(f"Prediction failed: {e}")
    print(format_predictions(results))
    if f.json:
        with open(f.json, "w") as out:
            json.dump(results, out, indent=1)
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
