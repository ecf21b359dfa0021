"""Dense outputs mapped back to image coordinates, and an image's guesses from them.

Applied to a whole image (the fully-convolutional view of vgg_jax.models), the box head
gives a box at every output location (i, j). Each location sees one image_size x
image_size window of the rescaled image, whose corner is TOTAL_STRIDE * (j, i) from the
view's corner (the fc6 "window" of VGG's head); its box is a centre box, fractions of that
window. The view itself is the rescaled image centre-cropped to its bucket shape
(evaluation's dense buckets, `data.transforms.fit_to_shape`) or to the central crop
(protocol 1, `data.transforms.centre_view`). `view_boxes` undoes all of that: window,
view crop and rescale, giving pixel boxes of the original image, clipped to it.

An image's guesses (protocol 2): for each of its top-5 classes, the boxes of that class
from every location (of every scale and net: their union) merged greedily, the merged box
with the largest score being the guess.
"""

from __future__ import annotations

import numpy as np

from vgg_jax.data import decode
from vgg_jax.localisation import boxes as box_lib
from vgg_jax.localisation.merging import best_box
from vgg_jax.models import TOTAL_STRIDE


def view_offset(width: int, height: int, q: int, view_shape: tuple[int, int]
                ) -> tuple[int, int]:
    """(left, top) of a view centre-cropped from an image rescaled to test scale q.

    Args:
      width, height: the image's size.
      q: the test scale (shorter side after rescaling).
      view_shape: (height, width) of the view: the crop side twice for the central crop,
        or the dense bucket shape.

    Returns:
      The view's corner in the rescaled image, as `centre_view` and `fit_to_shape` crop.
    """
    rw, rh = decode.rescaled_size(width, height, q)
    return (rw - view_shape[1]) // 2, (rh - view_shape[0]) // 2


def view_boxes(centres: np.ndarray, width: int, height: int, q: int,
               view_shape: tuple[int, int], window: int) -> np.ndarray:
    """The head's boxes over a view, as pixel boxes of the original image.

    Args:
      centres: [h, w, ..., 4] centre boxes at each output location (a 1 x 1 map for a
        single crop); any axes between the map and the box (classes) are kept.
      width, height: the original image's size.
      q: the test scale the view was made at.
      view_shape: (height, width) of the view fed to the net.
      window: the net's input size (image_size), each location's window side.

    Returns:
      [h, w, ..., 4] pixel boxes clipped to the image (a box wholly outside it collapses
      onto its border); a width or height below one pixel becomes one pixel.
    """
    centres = np.array(centres, np.float64)
    # A regressor may predict a size below one pixel, even a negative one (untrained, or
    # far from what it learned): such a box is one pixel wide or high, at its centre.
    centres[..., 2:] = np.maximum(centres[..., 2:], 1.0 / window)
    rw, rh = decode.rescaled_size(width, height, q)
    left0, top0 = view_offset(width, height, q, view_shape)
    rows, cols = centres.shape[:2]
    extra = (1,) * (centres.ndim - 3)
    left = (left0 + TOTAL_STRIDE * np.arange(cols))[None, :].reshape((1, cols) + extra)
    top = (top0 + TOTAL_STRIDE * np.arange(rows))[:, None].reshape((rows, 1) + extra)
    edges = box_lib.window_to_image(centres, left, top, window, (rw / width, rh / height))
    pixels = box_lib.edges_to_pixels(edges)
    limits = np.array([width - 1, height - 1, width - 1, height - 1], np.float64)
    return np.clip(pixels, 0.0, limits)


def image_guesses(classes: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
                  min_iou: float) -> tuple[np.ndarray, np.ndarray]:
    """An image's guesses: per class, its candidate boxes merged, the best merged box.

    Args:
      classes: [G] the classes to guess, best first (the classifier's top 5).
      boxes: [L, G, 4] pixel boxes: for every candidate location (of every scale and net,
        their union), the box of each class.
      scores: [L, G] the class's score at the box's location.
      min_iou: the merging threshold (`merging.greedy_merge`).

    Returns:
      (classes [G], boxes [G, 4]): one guess per class, in the given order.
    """
    boxes = np.asarray(boxes, np.float64)
    guesses = np.stack([best_box(boxes[:, g], scores[:, g], min_iou)[0]
                        for g in range(len(classes))])
    return np.asarray(classes), guesses
