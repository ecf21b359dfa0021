"""The box head: a training crop's target box, the Euclidean loss and its sums.

The net's last layer predicts a box as (centre x, centre y, width, height), fractions of
its input window (`boxes` module, "centre boxes"), 4 outputs per class (PCR) or 4 for all
(SCR). The paper's loss is Euclidean (Caffe's, 1/2 the squared distance, averaged over the
batch). Choices where the paper is silent (docs/localisation.md):

- the target of a crop is its image's ground-truth box mapped through the crop's rescale,
  crop and flip, not clipped to the crop (the net learns to predict the whole object, as
  OverFeat's regressor does, which keeps the boxes of neighbouring dense windows alike);
- of several boxes, the one with the largest area inside the crop is the target;
- a crop that sees less than `min_visible` of its target's area is dropped from the loss
  (weight 0; OverFeat skips boxes under half inside the field of view); so is an
  undecodable image;
- PCR's loss touches only the ground-truth class's 4 outputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vgg_jax.data.transforms import CropPlacement
from vgg_jax.localisation import boxes as box_lib
from vgg_jax.localisation.metric import IOU_THRESHOLD, iou
from vgg_jax.models import BOX_COORDINATES, PER_CLASS


def crop_target(pixel_boxes: np.ndarray, placement: CropPlacement, min_visible: float
                ) -> tuple[np.ndarray, np.float32]:
    """The target of one training crop: a centre box and its weight in the loss.

    Args:
      pixel_boxes: [K, 4] the image's pixel boxes of its class (clipped to the image here).
      placement: where the crop was taken.
      min_visible: the crop must hold at least this share of the target box's area.

    Returns:
      (float32 [4] centre box, fractions of the crop; float32 weight, 1 or 0 (dropped)).
    """
    clipped, _, kept = box_lib.clip_pixel_boxes(pixel_boxes, placement.width,
                                                placement.height)
    if not np.any(kept):
        return np.zeros(BOX_COORDINATES, np.float32), np.float32(0.0)
    edges = box_lib.to_crop(box_lib.pixels_to_edges(clipped[kept]), placement)
    visible = box_lib.visible_fraction(edges, placement.size)
    areas = (edges[:, 2] - edges[:, 0]) * (edges[:, 3] - edges[:, 1])
    best = int(np.argmax(visible * areas))  # the largest area inside the crop
    target = box_lib.edges_to_centres(edges[best], placement.size).astype(np.float32)
    return target, np.float32(visible[best] >= min_visible)


def class_boxes(outputs: jax.Array, labels: jax.Array, regression: str) -> jax.Array:
    """The box of each example's class: its 4 outputs (PCR) or the shared 4 (SCR).

    Args:
      outputs: [N, 4 * classes] (PCR) or [N, 4] (SCR), the head's outputs.
      labels: [N] classes (any valid index where unused).
      regression: PER_CLASS or SINGLE_CLASS.

    Returns:
      [N, 4] centre boxes.
    """
    if regression != PER_CLASS:
        return outputs
    per_class = outputs.reshape(outputs.shape[0], -1, BOX_COORDINATES)
    return jnp.take_along_axis(per_class, labels[:, None, None], axis=1)[:, 0]


def centres_to_pixels(centres, window: int):
    """Centre boxes (fractions of a window) -> pixel boxes in the window's pixels (jax or
    numpy), for the inclusive-pixel IoU."""
    half = centres[..., 2:] / 2.0
    lo = (centres[..., :2] - half) * window
    hi = (centres[..., :2] + half) * window - 1.0
    xp = jnp if isinstance(centres, jax.Array) else np
    return xp.concatenate([lo, hi], axis=-1)


def box_sums(outputs: jax.Array, labels: jax.Array, targets: jax.Array, weights: jax.Array,
             regression: str, window: int) -> dict[str, jax.Array]:
    """Weighted sums of the Euclidean loss and of crops localised wrongly (IoU < 0.5).

    Args:
      outputs: the head's outputs, [N, 4 * classes] or [N, 4].
      labels: [N] the examples' classes.
      targets: [N, 4] centre boxes (`crop_target`).
      weights: [N] float32, 0 for dropped crops, padding and undecodable images.
      regression: PER_CLASS or SINGLE_CLASS.
      window: the crop's side in pixels (for the IoU's inclusive pixels).

    Returns:
      {"loss": sum of 1/2 |box - target|^2, "loc_errors": crops whose box has IoU < 0.5
      with the target, "count": sum of weights}.
    """
    valid = weights > 0
    predicted = class_boxes(outputs.astype(jnp.float32), jnp.where(valid, labels, 0),
                            regression)
    losses = 0.5 * jnp.sum(jnp.square(predicted - targets), axis=-1)
    overlaps = iou(centres_to_pixels(predicted, window), centres_to_pixels(targets, window))
    return {
        "loss": jnp.sum(jnp.where(valid, losses, 0.0) * weights),
        "loc_errors": jnp.sum((overlaps < IOU_THRESHOLD) * weights),
        "count": jnp.sum(weights),
    }
