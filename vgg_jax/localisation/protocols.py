"""The paper's two localisation test protocols (Appendix A) and their device functions.

  central_crop  protocol 1 (Table 8): the central image_size crop of the image rescaled
                to Q, and the box of the ground-truth class; no classifier is involved.
  dense         protocol 2 (Tables 9 and 10): the box net applied densely over the whole
                image rescaled to each Q, every output location giving a box per class
                (mapped back to the image: `dense.view_boxes`); the classification net,
                applied densely too, ranks the classes (its top 5) and scores every
                location's box by that location's class probability; the boxes of a class
                from every location, scale and box net (their union) are merged greedily
                and the best merged box is the class's guess.

The views are made on the host (vgg_jax.data.transforms, as classification's), without
flips: the paper is silent on test-time flips for localisation, and a flipped view's boxes
would need mirroring before their union (docs/localisation.md). The classifier's ranking
uses its own evaluation's flip setting, exactly as its dense classification.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from vgg_jax.localisation.regression import class_boxes
from vgg_jax.models import BOX_COORDINATES, PER_CLASS
from vgg_jax.preprocess import normalize_images

CENTRAL_CROP, DENSE = "central_crop", "dense"
PROTOCOLS = (CENTRAL_CROP, DENSE)
# The paper's numbering of the protocols, shown beside our names.
PAPER_NUMBERS = {CENTRAL_CROP: 1, DENSE: 2}


def _outputs(model, mean_rgb, std_rgb, variables, views: jax.Array) -> jax.Array:
    """The net's dense outputs over a batch of one view per image, [B, h, w, width]."""
    x = views.reshape((-1,) + views.shape[2:])
    x = normalize_images(x, mean_rgb, std_rgb, None, model.dtype)
    return model.apply(variables, x, train=False, dense=True).astype(jnp.float32)


def crop_boxes(model, mean_rgb, std_rgb, regression: str, variables, views: jax.Array,
               labels: jax.Array) -> jax.Array:
    """Protocol 1's device function: the ground-truth class's box of each central crop.

    Args:
      model, mean_rgb, std_rgb: the box net and its input normalisation.
      regression: its head (PER_CLASS or SINGLE_CLASS).
      variables: its variables.
      views: uint8 [B, 1, S, S, 3], one crop of image_size per image.
      labels: [B] the images' classes (any valid index for padding).

    Returns:
      float32 [B, 4] centre boxes, fractions of the crop.
    """
    outputs = _outputs(model, mean_rgb, std_rgb, variables, views)
    return class_boxes(outputs.reshape(outputs.shape[0], -1), labels, regression)


def dense_candidates(box_nets: Sequence[tuple], classifier: tuple, variables: Sequence,
                     classifier_variables, views: jax.Array, classes: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
    """Protocol 2's device function: every location's box and score for chosen classes.

    Args:
      box_nets: per box net, (module, mean_rgb, std_rgb, regression); their output maps
        must have the classifier's shape (the same image_size and stride).
      classifier: (module, mean_rgb, std_rgb) of the classification net.
      variables: the box nets' variables, in order.
      classifier_variables: the classifier's.
      views: uint8 [B, 1, H, W, 3], the dense view of each image.
      classes: int [B, G], the classes to box (the classifier's top G per image).

    Returns:
      (float32 [B, R, h, w, G, 4] centre boxes of each box net at each location, fractions
      of the location's window; float32 [B, h, w, G] the classifier's softmax probability
      of each class at each location).
    """
    scores = _outputs(*classifier, classifier_variables, views)
    probabilities = jax.nn.softmax(scores, axis=-1)
    b, h, w = probabilities.shape[:3]
    chosen = jnp.broadcast_to(classes[:, None, None, :], (b, h, w, classes.shape[-1]))
    location_scores = jnp.take_along_axis(probabilities, chosen, axis=-1)
    per_net = []
    for (model, mean_rgb, std_rgb, regression), net_variables in zip(box_nets, variables):
        outputs = _outputs(model, mean_rgb, std_rgb, net_variables, views)
        if outputs.shape[1:3] != (h, w):
            raise ValueError(
                f"A box net's output map {outputs.shape[1:3]} differs from the classifier's "
                f"{(h, w)}; the nets must share their input size.")
        boxes = outputs.reshape(b, h, w, -1, BOX_COORDINATES)
        if regression == PER_CLASS:
            boxes = jnp.take_along_axis(boxes, chosen[..., None], axis=3)
        else:  # one box for every class
            boxes = jnp.broadcast_to(boxes, (b, h, w, classes.shape[-1], BOX_COORDINATES))
        per_net.append(boxes)
    return jnp.stack(per_net, axis=1), location_scores
