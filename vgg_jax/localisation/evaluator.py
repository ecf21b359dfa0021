"""The localisation protocols run over a split, every image counted exactly once.

The road is classification's (vgg_jax.evaluation): the plan's ownership and padded
buckets (`evaluation.plan`), grain threads making the views, jitted device functions on
the data mesh; protocol 2's class ranking IS classification's dense evaluation
(`evaluation.evaluator.Evaluator`, keeping its softmax outputs). What is new happens on
the host, per image: mapping boxes back to the image, merging, and ILSVRC's metric. The
counts of every process are summed at the end, so any number of hosts gives one result.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec

from vgg_jax.data import decode, transforms
from vgg_jax.evaluation import plan
from vgg_jax.evaluation import protocols as classification_protocols
from vgg_jax.evaluation.evaluator import EvalNet, Evaluator
from vgg_jax.localisation import boxes as box_lib
from vgg_jax.localisation import dense, metric, protocols, regression
from vgg_jax.localisation.source import LocalisationSource
from vgg_jax.runtime import parallel

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BoxNet:
    """A box net to evaluate: the EvalNet and its head (PER_CLASS or SINGLE_CLASS)."""

    net: EvalNet
    regression: str


@dataclasses.dataclass(frozen=True)
class CropOutcome:
    """Protocol 1 over a split (sums over every process).

    Attributes:
      correct: images whose box has IoU >= 0.5 with a ground-truth box.
      images: images counted (decoded; padding and undecodable images are not).
      loss: the sum of 1/2 |box - target|^2 over the crops that keep their target.
      loss_count: those crops (`regression.crop_target`'s weight).
      clipped: ground-truth boxes clipped to their image.
      undecodable: images that could not be decoded.
    """

    correct: float
    images: float
    loss: float
    loss_count: float
    clipped: float
    undecodable: float

    @property
    def error(self) -> float:
        """The localisation error in percent."""
        return metric.localisation_error(self.correct, self.images)


@dataclasses.dataclass(frozen=True)
class DenseOutcome:
    """Protocol 2 over a split: `correct`, `images`, `clipped`, `undecodable` as
    CropOutcome's, and the classifier's own dense classification rows (its ranking)."""

    correct: float
    images: float
    clipped: float
    undecodable: float
    classification: tuple

    @property
    def error(self) -> float:
        return metric.localisation_error(self.correct, self.images)


@dataclasses.dataclass(frozen=True)
class _ViewMaker:
    """Decodes one local image and makes its view at q (plan.ViewMaker's, plus the
    image's size, which maps boxes back)."""

    source: LocalisationSource
    global_indices: np.ndarray
    component: str
    q: int
    image_size: int
    shape: tuple[int, int]

    def _example(self, views, mask, row, label, size):
        return {"views": views, "mask": np.bool_(mask), "row": np.int64(row),
                "label": np.int32(label), "size": np.asarray(size, np.int64)}

    def __call__(self, row: int) -> dict[str, np.ndarray]:
        empty = np.zeros((1,) + tuple(self.shape) + (3,), np.uint8)
        if row < 0:  # Padding.
            return self._example(empty, False, -1, 0, (0, 0))
        record = self.source[int(self.global_indices[row])]
        try:
            size = decode.image_size(record["image"])
            views = transforms.image_views(record["image"], self.component, self.q,
                                           self.image_size, flip=False, shape=self.shape)
        except decode.DECODE_ERRORS as e:
            logger.warning("Skipping undecodable image %s (%s: %s).",
                           record.get("name", row), e.__class__.__name__, e)
            return self._example(empty, False, row, record["label"], (0, 0))
        return self._example(np.ascontiguousarray(views), True, row, record["label"], size)


class LocalisationEvaluator:
    """Runs the localisation protocols on one split.

    Args:
      source: the split's images with their boxes.
      image_size: the nets' input size.
      batch_size: net inputs of image_size^2 per global batch (config.eval.batch_size).
      mesh: the data mesh (default: every device).
      num_threads: host threads making views.
      dense_size_step: dense views are cropped to multiples of it (config.eval).
      min_visible: the share of a box a central crop must hold for its loss to count.
      min_iou: the merging threshold of protocol 2.
    """

    def __init__(self, source: LocalisationSource, image_size: int, *, batch_size: int,
                 mesh=None, num_threads: int = 4, dense_size_step: int = 32,
                 min_visible: float = 0.5, min_iou: float = 0.5):
        self.source, self.image_size = source, int(image_size)
        self.batch_size, self.num_threads = int(batch_size), int(num_threads)
        self.mesh = mesh if mesh is not None else parallel.create_mesh()
        self.dense_size_step = int(dense_size_step)
        self.min_visible, self.min_iou = float(min_visible), float(min_iou)
        self.global_indices = plan.local_indices(len(source), jax.process_index(),
                                                 jax.process_count())
        self._buckets: dict[tuple[str, int], list[plan.Bucket]] = {}
        self._functions: dict[tuple, Any] = {}

    def _protocol(self, component: str, q: int) -> classification_protocols.Protocol:
        # The views of one pass: no flips (module docstring of localisation.protocols).
        return classification_protocols.Protocol(
            component, (q,), flip=False, dense_size_step=self.dense_size_step)

    def buckets(self, component: str, q: int) -> list[plan.Bucket]:
        """The padded batches of one pass (planned once per evaluator)."""
        if (component, q) not in self._buckets:
            protocol = self._protocol(component, q)
            keys = plan.pass_keys(self.source, self.global_indices, protocol, component, q,
                                  self.image_size, self.num_threads, jax.process_count())
            shapes = {tuple(int(v) for v in k) for k in keys.reshape(-1, 2) if k[0] >= 0}
            costs = {s: protocol.cost(component, s, self.image_size) for s in shapes}
            self._buckets[component, q] = plan.plan_buckets(
                keys, costs, self.batch_size, self.mesh.devices.size, jax.process_count())
        return self._buckets[component, q]

    def _batches(self, component: str, q: int):
        """(bucket shape, host batch) of every batch of one pass, in plan order."""
        for bucket in self.buckets(component, q):
            maker = _ViewMaker(self.source, self.global_indices, component, q,
                               self.image_size, bucket.shape)
            for batch in plan.view_batches(maker, bucket, self.num_threads):
                yield bucket.shape, batch

    def _local(self, array: jax.Array) -> np.ndarray:
        """This process's rows of a batch-sharded output."""
        return np.asarray(jax.device_get(multihost_utils.global_array_to_host_local_array(
            array, self.mesh, PartitionSpec(parallel.DATA_AXIS))))

    def _ground_truth(self, row: int, size) -> tuple[np.ndarray, int]:
        """The pixel boxes of a local image, clipped to it, and how many were clipped."""
        clipped, changed, kept = box_lib.clip_pixel_boxes(
            self.source.boxes(int(self.global_indices[row])), *size)
        return clipped[kept], int(np.sum(changed & kept))

    def central_crop(self, box_net: BoxNet, q: int) -> CropOutcome:
        """Protocol 1: the central crop at q, the box of the ground-truth class.

        Args:
          box_net: the box net.
          q: the test scale.

        Returns:
          The CropOutcome (global over processes).
        """
        net = box_net.net
        key = (protocols.CENTRAL_CROP, net.model, tuple(net.mean_rgb), tuple(net.std_rgb),
               box_net.regression)
        if key not in self._functions:
            self._functions[key] = jax.jit(
                functools.partial(protocols.crop_boxes, *key[1:]),
                out_shardings=parallel.batch_sharded(self.mesh))
        function, variables = self._functions[key], parallel.replicate(net.variables, self.mesh)
        crop = self.image_size
        sums = np.zeros(6)  # correct, images, loss, loss_count, clipped, undecodable
        for _, batch in self._batches(transforms.SINGLE_CROP, q):
            device = parallel.shard_batch({k: batch[k] for k in ("views", "label")}, self.mesh)
            predicted = self._local(function(variables, device["views"], device["label"]))
            for i in np.flatnonzero(batch["row"] >= 0):
                if not batch["mask"][i]:
                    sums[5] += 1
                    continue
                size = tuple(int(v) for v in batch["size"][i])
                truth, clipped = self._ground_truth(int(batch["row"][i]), size)
                box = dense.view_boxes(predicted[i][None, None], *size, q, (crop, crop),
                                       crop)[0, 0]
                rw, rh = decode.rescaled_size(*size, q)
                placement = transforms.CropPlacement(*size, rw, rh, (rw - crop) // 2,
                                                     (rh - crop) // 2, crop, False)
                target, weight = regression.crop_target(truth, placement, self.min_visible)
                sums += (metric.best_overlap(box, truth) >= metric.IOU_THRESHOLD, 1,
                         weight * 0.5 * np.sum(np.square(predicted[i] - target)), weight,
                         clipped, 0)
        totals = parallel.sum_over_processes(np.asarray(sums, np.float64))
        return CropOutcome(*(float(v) for v in totals))

    def dense(self, box_nets: Sequence[BoxNet], classifier: EvalNet, scales: Sequence[int],
              classifier_flip: bool) -> DenseOutcome:
        """Protocol 2: dense boxes at every q, ranked and scored by the classifier.

        Args:
          box_nets: the box nets whose boxes are united (one, or the paper's fusion).
          classifier: the classification net.
          scales: the test scales Q (boxes of every scale are united too).
          classifier_flip: average the classifier's ranking with the flipped image's.

        Returns:
          The DenseOutcome (global over processes).
        """
        ranking = Evaluator(
            self.source, classification_protocols.Protocol(
                transforms.DENSE, tuple(scales), flip=classifier_flip,
                dense_size_step=self.dense_size_step),
            self.image_size, batch_size=self.batch_size, mesh=self.mesh,
            num_threads=self.num_threads).run([classifier], keep_probabilities=True)
        guesses = min(metric.GUESSES, classifier.model.num_classes)
        top = np.argsort(-ranking.probabilities, axis=1, kind="stable")[:, :guesses]
        function = self._dense_function(box_nets, classifier)
        variables = ([parallel.replicate(b.net.variables, self.mesh) for b in box_nets],
                     parallel.replicate(classifier.variables, self.mesh))
        candidates: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        images: dict[int, tuple[tuple[int, int], int]] = {}  # row -> (size, label)
        undecodable = set()
        for q in scales:
            for shape, batch in self._batches(transforms.DENSE, q):
                rows = batch["row"]
                classes = np.zeros((len(rows), guesses), np.int32)
                classes[rows >= 0] = top[rows[rows >= 0]]
                device = parallel.shard_batch({"views": batch["views"], "classes": classes},
                                              self.mesh)
                boxes, scores = (self._local(a) for a in function(
                    *variables, device["views"], device["classes"]))
                for i in np.flatnonzero(rows >= 0):
                    if not batch["mask"][i]:
                        undecodable.add(int(rows[i]))
                        continue
                    size = tuple(int(v) for v in batch["size"][i])
                    images[int(rows[i])] = (size, int(batch["label"][i]))
                    # [R, h, w, G, 4] -> the locations first, as view_boxes takes them.
                    located = np.moveaxis(boxes[i], 0, 2)
                    pixels = dense.view_boxes(located, *size, q, shape, self.image_size)
                    located_scores = np.broadcast_to(scores[i][:, :, None], located.shape[:-1])
                    candidates.setdefault(int(rows[i]), []).append(
                        (pixels.reshape(-1, guesses, 4), located_scores.reshape(-1, guesses)))
        sums = np.zeros(4)  # correct, images, clipped, undecodable
        sums[3] = len(undecodable)
        for row, parts in candidates.items():
            size, label = images[row]
            truth, clipped = self._ground_truth(row, size)
            classes, boxes = dense.image_guesses(
                top[row], np.concatenate([p[0] for p in parts]),
                np.concatenate([p[1] for p in parts]), self.min_iou)
            sums += (metric.is_correct(classes, boxes, label, truth), 1, clipped, 0)
        totals = parallel.sum_over_processes(np.asarray(sums, np.float64))
        correct, counted, clipped, bad = (float(v) for v in totals)
        return DenseOutcome(correct, counted, clipped, bad, ranking.rows)

    def _dense_function(self, box_nets: Sequence[BoxNet], classifier: EvalNet):
        """The jitted `protocols.dense_candidates` of these nets (made once)."""
        key = (protocols.DENSE,
               tuple((b.net.model, tuple(b.net.mean_rgb), tuple(b.net.std_rgb), b.regression)
                     for b in box_nets),
               (classifier.model, tuple(classifier.mean_rgb), tuple(classifier.std_rgb)))
        if key not in self._functions:
            self._functions[key] = jax.jit(
                functools.partial(protocols.dense_candidates, *key[1:]),
                out_shardings=(parallel.batch_sharded(self.mesh),) * 2)
        return self._functions[key]
