"""Protocol 2 on one image: its top-5 (class, box) guesses, for prediction.

The same steps as `LocalisationEvaluator.dense` for a single encoded image: the
classifier's dense softmax averaged over the test scales ranks the classes, every
location's box of each ranked class (every scale, every box net) is mapped back to the
image, and the boxes of each class are merged greedily.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import numpy as np

from vgg_jax.data import decode, transforms
from vgg_jax.evaluation import protocols as classification_protocols
from vgg_jax.evaluation.evaluator import EvalNet
from vgg_jax.localisation import dense, metric, protocols
from vgg_jax.localisation.evaluator import BoxNet


@dataclasses.dataclass(frozen=True)
class Guess:
    """One of an image's guesses: a class, its probability and its pixel box."""

    label: int
    probability: float
    box: tuple[float, float, float, float]


@functools.lru_cache(maxsize=8)
def _class_function(model, mean_rgb, std_rgb, flip):
    return jax.jit(functools.partial(classification_protocols.class_probabilities, model,
                                     mean_rgb, std_rgb, flip))


@functools.lru_cache(maxsize=8)
def _box_function(box_nets, classifier):
    return jax.jit(functools.partial(protocols.dense_candidates, box_nets, classifier))


def localise_image(data: bytes, box_nets: Sequence[BoxNet], classifier: EvalNet,
                   scales: Sequence[int], *, classifier_flip: bool, dense_size_step: int,
                   min_iou: float) -> list[Guess]:
    """An image's guesses by protocol 2, best class first.

    Args:
      data: the encoded image.
      box_nets: the box nets (their boxes united).
      classifier: the classification net ranking the classes.
      scales: the test scales Q.
      classifier_flip: average the classifier's softmax with the flipped image's.
      dense_size_step: the dense views' bucket step (config.eval.dense_size_step).
      min_iou: the merging threshold.

    Returns:
      Up to 5 Guesses (the classifier's top classes), each with its merged box.

    Raises:
      One of decode.DECODE_ERRORS for an undecodable image.
    """
    width, height = decode.image_size(data)
    image_size = classifier.model.image_size
    views = {}
    for q in scales:
        shape = transforms.dense_shape(height, width, q, image_size, dense_size_step)
        views[q] = (shape, transforms.image_views(data, transforms.DENSE, q, image_size,
                                                  flip=False, shape=shape)[None])
    rank = _class_function(classifier.model, tuple(classifier.mean_rgb),
                           tuple(classifier.std_rgb), classifier_flip)
    probabilities = np.mean([np.asarray(rank(classifier.variables, v))[0]
                             for _, v in views.values()], axis=0)
    top = np.argsort(-probabilities, kind="stable")[: min(metric.GUESSES, len(probabilities))]
    candidates = _box_function(
        tuple((b.net.model, tuple(b.net.mean_rgb), tuple(b.net.std_rgb), b.regression)
              for b in box_nets),
        (classifier.model, tuple(classifier.mean_rgb), tuple(classifier.std_rgb)))
    boxes, scores = [], []
    for q, (shape, view) in views.items():
        located, located_scores = candidates(
            [b.net.variables for b in box_nets], classifier.variables, view,
            np.asarray(top, np.int32)[None])
        located = np.moveaxis(np.asarray(located)[0], 0, 2)  # [h, w, R, G, 4]
        pixels = dense.view_boxes(located, width, height, q, shape, image_size)
        boxes.append(pixels.reshape(-1, len(top), 4))
        scores.append(np.broadcast_to(np.asarray(located_scores)[0][:, :, None],
                                      located.shape[:-1]).reshape(-1, len(top)))
    classes, merged = dense.image_guesses(top, np.concatenate(boxes), np.concatenate(scores),
                                          min_iou)
    return [Guess(int(c), float(probabilities[c]), tuple(float(v) for v in box))
            for c, box in zip(classes, merged)]
