"""How an evaluation pass is laid out: image ownership, shape buckets and padded batches.

One pass is one protocol component (single crop, dense or multi-crop) at one test scale Q.
Exactness on any number of devices and processes: image i belongs to process
i % process_count for every pass; each process groups its images into buckets of equal view
shape and pads its share of every bucket to the same number of batches as every other
process (padding rows carry mask 0), so collectives never wait on a process that ran out;
per-image results are only ever counted on the owning process.

Dense views differ in shape: the rescaled image is centre-cropped to a multiple of
config.eval.dense_size_step and images of one shape are batched together, so each bucket
compiles once per net and the last partial batch is padded rather than compiled again.

Nothing here runs a net; vgg_jax.evaluation.evaluator does.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from vgg_jax.data import decode, transforms
from vgg_jax.evaluation.protocols import Protocol

logger = logging.getLogger(__name__)


def local_indices(total: int, process_index: int, process_count: int) -> np.ndarray:
    """The global indices of the images a process owns: i % process_count == process_index."""
    return np.arange(process_index, total, process_count)


@dataclasses.dataclass
class Bucket:
    """Images of one view shape, each process's share padded to the same number of batches.

    Attributes:
      shape: (height, width) of the views.
      rows: this process's local image positions, -1 for padding; [num_batches * local_batch].
      local_batch: images per batch on this process.
    """

    shape: tuple[int, int]
    rows: np.ndarray
    local_batch: int

    @property
    def num_batches(self) -> int:
        return len(self.rows) // self.local_batch


def images_per_batch(cost: int, budget: int, device_count: int) -> int:
    """Global images per batch: `budget` net inputs of image_size^2, a multiple of devices.

    Args:
      cost: net inputs of image_size^2 one image costs (views, flips and area).
      budget: config.eval.batch_size (net inputs of image_size^2 per global batch).
      device_count: devices of the mesh.
    """
    n = budget // max(cost, 1) // device_count * device_count
    return max(n, device_count)


def plan_buckets(
    keys: np.ndarray, costs: Mapping[tuple[int, int], int], budget: int,
    device_count: int, process_count: int, process_index: int | None = None,
) -> list[Bucket]:
    """Groups this process's images by view shape into padded batches.

    Every process must call this with its own `keys` after they were gathered, so that all
    processes agree on the buckets and their number of batches.

    Args:
      keys: [process_count, max_local, 2] int view shapes of every process's images
        (-1 rows for padding), as gathered from all processes; row `process_index` is ours.
      costs: net inputs per image for each shape (see `images_per_batch`).
      budget, device_count, process_count: see `images_per_batch`.
      process_index: this process (default: jax.process_index()).

    Returns:
      The buckets in sorted shape order.
    """
    process_index = jax.process_index() if process_index is None else process_index
    valid = keys[..., 0] >= 0
    shapes = sorted({tuple(int(v) for v in k) for k in keys[valid]})
    buckets = []
    for shape in shapes:
        local_batch = images_per_batch(costs[shape], budget, device_count) // process_count
        in_bucket = (keys[..., 0] == shape[0]) & (keys[..., 1] == shape[1]) & valid
        per_process = in_bucket.sum(axis=1)
        num_batches = math.ceil(per_process.max() / local_batch)
        rows = np.full(num_batches * local_batch, -1, np.int64)
        mine = np.flatnonzero(in_bucket[process_index])
        rows[: len(mine)] = mine
        buckets.append(Bucket(shape, rows, local_batch))
    return buckets


def uniform_keys(total: int, shape: tuple[int, int], process_count: int) -> np.ndarray:
    """Bucket keys when every image has the same view shape (single and multi-crop).

    Args:
      total: images in the split.
      shape: the view shape (image_size, image_size).
      process_count: processes sharing the split (image i belongs to i % process_count).

    Returns:
      int64 [process_count, max images per process, 2]: `shape`, or -1 for padding.
    """
    # Every image has the same view shape; only the per-process counts matter, and those
    # follow from i % process_count, so no communication is needed.
    counts = [len(range(p, total, process_count)) for p in range(process_count)]
    keys = np.full((process_count, max(counts), 2), -1, np.int64)
    for p, n in enumerate(counts):
        keys[p, :n] = shape
    return keys


def gather_dense_keys(
    source, global_indices: np.ndarray, q: int, image_size: int, step: int, num_threads: int,
    process_count: int,
) -> np.ndarray:
    """Every process's dense view shapes at scale q (reads image headers, not pixels).

    Args:
      source: the evaluation split (records with "image" bytes).
      global_indices: this process's image indices into `source`.
      q: the test scale.
      image_size: the crop side (the smallest bucket).
      step: bucket shapes are multiples of it (config.eval.dense_size_step).
      num_threads: header-reading threads.
      process_count: processes sharing the split.

    Returns:
      int64 [process_count, max images per process, 2], -1 for padding; the same on
      every process (gathered), so all of them plan the same buckets.
    """
    import grain

    def key(index):
        w, h = decode.image_size(source[int(index)]["image"])
        return np.array(transforms.dense_shape(h, w, q, image_size, step), np.int64)

    def safe_key(index):
        try:
            return key(index)
        except decode.DECODE_ERRORS:
            # Undecodable: any bucket will do, the image is masked when it fails to load.
            return np.array((image_size, image_size), np.int64)

    dataset = grain.MapDataset.source(global_indices.tolist()).map(safe_key)
    if num_threads > 0:
        local = list(dataset.to_iter_dataset(grain.ReadOptions(num_threads=num_threads)))
    else:
        local = [dataset[i] for i in range(len(dataset))]
    max_local = math.ceil(len(source) / process_count)
    keys = np.full((max_local, 2), -1, np.int64)
    if local:
        keys[: len(local)] = np.stack(local)
    if process_count == 1:
        return keys[None]
    return np.asarray(multihost_utils.process_allgather(keys))


def pass_keys(source, global_indices: np.ndarray, protocol: Protocol, component: str, q: int,
              image_size: int, num_threads: int, process_count: int) -> np.ndarray:
    """Every process's view shapes for one pass (dense: read from the image headers).

    Args:
      source: the evaluation split.
      global_indices: this process's images (`local_indices`).
      protocol: the protocol (its dense_size_step).
      component: the pass's component.
      q: the pass's test scale.
      image_size: the crop side.
      num_threads: header-reading threads (dense only).
      process_count: processes sharing the split.

    Returns:
      int64 [process_count, max images per process, 2], -1 for padding.
    """
    if component == transforms.DENSE:
        return gather_dense_keys(source, global_indices, q, image_size,
                                 protocol.dense_size_step, num_threads, process_count)
    return uniform_keys(len(source), (image_size, image_size), process_count)


@dataclasses.dataclass(frozen=True)
class ViewMaker:
    """Decodes one local image at test scale q and makes its views for one pass.

    Attributes:
      source: the evaluation split.
      global_indices: this process's images.
      protocol: the protocol (grid, flip).
      component: the pass's component.
      q: the pass's test scale.
      image_size: the crop side.
      shape: the bucket's view shape.
    """

    source: Any
    global_indices: np.ndarray
    protocol: Protocol
    component: str
    q: int
    image_size: int
    shape: tuple[int, int]

    def _example(self, views, mask, row, label) -> dict[str, np.ndarray]:
        return {"views": views, "mask": np.bool_(mask), "row": np.int64(row),
                "label": np.int32(label)}

    def __call__(self, row: int) -> dict[str, np.ndarray]:
        empty = np.zeros((self.protocol.host_views(self.component),) + tuple(self.shape) + (3,),
                         np.uint8)
        if row < 0:  # Padding.
            return self._example(empty, False, -1, -1)
        record = self.source[int(self.global_indices[row])]
        try:
            views = transforms.image_views(
                record["image"], self.component, self.q, self.image_size, self.protocol.grid,
                self.protocol.flip, self.shape)
        except decode.DECODE_ERRORS as e:
            logger.warning("Skipping undecodable image %s (%s: %s).",
                           record.get("name", row), e.__class__.__name__, e)
            return self._example(empty, False, row, record["label"])
        return self._example(np.ascontiguousarray(views), True, row, record["label"])


def view_batches(maker: ViewMaker, bucket: Bucket, num_threads: int) -> Iterable[dict]:
    """Batches of one bucket's views, decoded by grain in background threads, in plan order.

    Args:
      maker: makes the views of one image row.
      bucket: the rows and the local batch size of one shape.
      num_threads: decoding threads (0: decode in this thread).

    Returns:
      An iterable of batches: "views" [B, V, H, W, 3] uint8, "mask", "row", "label".
    """
    import grain

    dataset = grain.MapDataset.source(bucket.rows.tolist()).map(maker).batch(bucket.local_batch)
    if num_threads <= 0:
        return (dataset[i] for i in range(len(dataset)))
    return dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
    )
