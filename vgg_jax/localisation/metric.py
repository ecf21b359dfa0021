"""ILSVRC's localisation metric: IoU with inclusive-pixel areas, and the 5-guess error.

An image is localised correctly when one of its (up to) 5 guesses, each a class and a
box, names the image's class and overlaps some ground-truth box of that class with
IoU >= 0.5. ILSVRC's devkit measures areas in its inclusive-pixel convention: a box from
pixel xmin to pixel xmax is xmax - xmin + 1 pixels wide, so the one-pixel box (3, 3, 3, 3)
has area 1, and two boxes that share one column overlap by one pixel of width. The error
is the share of images with no correct guess (the paper's Tables 8-10, in percent).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# ILSVRC: a guess is correct from this overlap (the devkit compares with >=).
IOU_THRESHOLD = 0.5
# ILSVRC's top-5 localisation: up to this many (class, box) guesses per image.
GUESSES = 5


def iou(a, b):
    """Intersection over union of pixel boxes, areas counted in inclusive pixels.

    Args:
      a, b: [..., 4] pixel boxes (xmin, ymin, xmax, ymax), broadcast against each other;
        numpy or jax arrays (real values allowed: predicted boxes need not be whole).

    Returns:
      [...] IoU in [0, 1]; 0 where the union is empty (a degenerate box against another).
    """
    xp = jnp if isinstance(a, jax.Array) or isinstance(b, jax.Array) else np
    a, b = xp.asarray(a), xp.asarray(b)
    extent = lambda lo, hi: xp.maximum(hi - lo + 1.0, 0.0)
    inter = (extent(xp.maximum(a[..., 0], b[..., 0]), xp.minimum(a[..., 2], b[..., 2]))
             * extent(xp.maximum(a[..., 1], b[..., 1]), xp.minimum(a[..., 3], b[..., 3])))
    area = lambda box: extent(box[..., 0], box[..., 2]) * extent(box[..., 1], box[..., 3])
    union = area(a) + area(b) - inter
    return xp.where(union > 0, inter / xp.where(union > 0, union, 1.0), 0.0)


def best_overlap(box: np.ndarray, ground_truth: np.ndarray) -> float:
    """The largest IoU of one pixel box with any of an image's ground-truth boxes.

    Args:
      box: [4] a pixel box.
      ground_truth: [K, 4] pixel boxes (K may be 0).

    Returns:
      The largest IoU, 0 when there is no ground-truth box.
    """
    ground_truth = np.asarray(ground_truth, np.float64).reshape(-1, 4)
    if not len(ground_truth):
        return 0.0
    return float(np.max(iou(np.asarray(box, np.float64)[None], ground_truth)))


def is_correct(guess_classes: Sequence[int], guess_boxes: np.ndarray, label: int,
               ground_truth: np.ndarray, threshold: float = IOU_THRESHOLD) -> bool:
    """Whether one of an image's guesses localises it (ILSVRC's rule).

    Args:
      guess_classes: [G] the guesses' classes, best first (ILSVRC takes the first 5).
      guess_boxes: [G, 4] their pixel boxes.
      label: the image's class.
      ground_truth: [K, 4] the pixel boxes of the image's class.
      threshold: the IoU from which a box counts (0.5).

    Returns:
      True when a guess among the first GUESSES has the image's class and IoU >= threshold
      with some ground-truth box.
    """
    guess_boxes = np.asarray(guess_boxes, np.float64).reshape(-1, 4)
    return any(int(c) == int(label) and best_overlap(box, ground_truth) >= threshold
               for c, box in list(zip(guess_classes, guess_boxes))[:GUESSES])


def localisation_error(correct: int | float, images: int | float) -> float:
    """The localisation error in percent: images without a correct guess, of all counted.

    Args:
      correct: images localised correctly.
      images: images counted.

    Returns:
      100 * (1 - correct / images); nan without images.
    """
    return 100.0 * (images - correct) / images if images else float("nan")
