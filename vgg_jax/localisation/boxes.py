"""Boxes and how they move with an image: rescale, crop, flip, and back.

Three forms of one box, each where it belongs:

  pixel boxes   (xmin, ymin, xmax, ymax), the first and last pixel inside the box, in the
                image's pixel indices (0-based): ILSVRC's annotations and its devkit, whose
                areas count pixels inclusively (`metric.iou`).
  edge boxes    (x0, y0, x1, y1), continuous coordinates of the box's edges, pixel i
                covering [i, i + 1): x0 = xmin, x1 = xmax + 1. Geometry (rescaling,
                cropping, flipping) is exact in this form.
  centre boxes  (centre x, centre y, width, height) as fractions of a square window (a
                training crop, or one output location's window in dense evaluation): what
                the net regresses (the paper's box parameterisation).

Every function takes arrays of boxes, [..., 4], and returns float64 unless said otherwise.
"""

from __future__ import annotations

import numpy as np

from vgg_jax.data.transforms import CropPlacement

# Pixel-box coordinates of one box, (xmin, ymin, xmax, ymax).
BOX_SIZE = 4


def pixels_to_edges(boxes: np.ndarray) -> np.ndarray:
    """Pixel boxes (inclusive last pixel) -> edge boxes (x1 = xmax + 1).

    Args:
      boxes: [..., 4] (xmin, ymin, xmax, ymax).

    Returns:
      [..., 4] (x0, y0, x1, y1).
    """
    boxes = np.asarray(boxes, np.float64)
    return np.concatenate([boxes[..., :2], boxes[..., 2:] + 1.0], axis=-1)


def edges_to_pixels(boxes: np.ndarray) -> np.ndarray:
    """Edge boxes -> pixel boxes (xmax = x1 - 1); the inverse of `pixels_to_edges`."""
    boxes = np.asarray(boxes, np.float64)
    return np.concatenate([boxes[..., :2], boxes[..., 2:] - 1.0], axis=-1)


def clip_pixel_boxes(boxes: np.ndarray, width: int, height: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clips pixel boxes to an image: the known fault of boxes reaching outside it.

    Args:
      boxes: [N, 4] pixel boxes (min <= max already checked by the annotation parser).
      width, height: the image's size in pixels.

    Returns:
      (clipped boxes [N, 4], changed [N] bool: the box reached outside the image, kept [N]
      bool: something of the box is left inside the image).
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, BOX_SIZE)
    limits = np.array([width - 1, height - 1, width - 1, height - 1], np.float64)
    clipped = np.clip(boxes, 0.0, limits)
    changed = np.any(clipped != boxes, axis=-1)
    kept = (clipped[:, 2] >= clipped[:, 0]) & (clipped[:, 3] >= clipped[:, 1]) & np.all(
        (boxes[:, 2:] >= 0) & (boxes[:, :2] <= limits[:2]), axis=-1)
    return clipped, changed, kept


def rescale_factors(placement: CropPlacement) -> tuple[float, float]:
    """(x, y) factors from source pixels to the rescaled image of a placement."""
    return placement.rescaled_width / placement.width, placement.rescaled_height / placement.height


def to_crop(edges: np.ndarray, placement: CropPlacement) -> np.ndarray:
    """Source-image edge boxes -> edge boxes in a crop's pixels (rescale, crop, flip).

    Args:
      edges: [..., 4] edge boxes in source pixels.
      placement: where the crop was taken (`data.transforms.CropPlacement`).

    Returns:
      [..., 4] edge boxes in the crop's pixels, [0, crop size) inside it (not clipped: a
      box may reach outside the crop).
    """
    fx, fy = rescale_factors(placement)
    edges = np.asarray(edges, np.float64)
    x0 = edges[..., 0] * fx - placement.left
    x1 = edges[..., 2] * fx - placement.left
    y0 = edges[..., 1] * fy - placement.top
    y1 = edges[..., 3] * fy - placement.top
    if placement.flip:  # mirrored about the crop's vertical centre line: edges swap
        x0, x1 = placement.size - x1, placement.size - x0
    return np.stack([x0, y0, x1, y1], axis=-1)


def window_to_image(centres: np.ndarray, left: np.ndarray, top: np.ndarray, window: int,
                    factors: tuple[float, float]) -> np.ndarray:
    """Centre boxes of windows of a rescaled image -> edge boxes in source pixels.

    Args:
      centres: [..., 4] centre boxes, fractions of their window.
      left, top: [...] each box's window corner in rescaled pixels (broadcast).
      window: the window's side in rescaled pixels (the crop size).
      factors: (x, y) source -> rescaled factors (`rescale_factors`).

    Returns:
      [..., 4] edge boxes in source pixels.
    """
    edges = centres_to_edges(centres, window)
    fx, fy = factors
    offset = np.stack(np.broadcast_arrays(left, top, left, top), axis=-1)
    return (edges + offset) / np.array([fx, fy, fx, fy])


def edges_to_centres(edges: np.ndarray, window: int) -> np.ndarray:
    """Edge boxes in a window's pixels -> centre boxes as fractions of the window side."""
    edges = np.asarray(edges, np.float64)
    centre = (edges[..., :2] + edges[..., 2:]) / 2.0
    size = edges[..., 2:] - edges[..., :2]
    return np.concatenate([centre, size], axis=-1) / float(window)


def centres_to_edges(centres: np.ndarray, window: int) -> np.ndarray:
    """Centre boxes (fractions of a window) -> edge boxes in the window's pixels."""
    centres = np.asarray(centres, np.float64) * float(window)
    half = centres[..., 2:] / 2.0
    return np.concatenate([centres[..., :2] - half, centres[..., :2] + half], axis=-1)


def visible_fraction(edges: np.ndarray, size: int) -> np.ndarray:
    """The share of each box's area inside the square [0, size)^2 (0 for an empty box).

    Args:
      edges: [..., 4] edge boxes in a crop's pixels.
      size: the crop's side.

    Returns:
      [...] fractions in [0, 1].
    """
    edges = np.asarray(edges, np.float64)
    inside = np.clip(edges, 0.0, float(size))
    area = lambda b: np.maximum(b[..., 2] - b[..., 0], 0.0) * np.maximum(b[..., 3] - b[..., 1], 0.0)
    full = area(edges)
    return np.where(full > 0, area(inside) / np.where(full > 0, full, 1.0), 0.0)
