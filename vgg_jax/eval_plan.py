"""How an evaluation pass is laid out on the host: views, buckets and padded batches.

One pass of the evaluation (vgg_jax.evaluate) is one protocol component (single crop, dense or
multi-crop) at one test scale Q. This module holds everything such a pass needs before a net
runs: the components' names, the host-side views of an image (the centre crop, the dense view
cropped to its bucket shape, the multi-crop grid and its flips), the grouping of the images
into equal-shape buckets that every process pads to the same number of batches, and the grain
pipeline that decodes the views in plan order. `ArrayImages` is an in-memory split in the
record format of vgg_jax.data.sources, for tests and tools.

It knows nothing of nets or results, so the evaluation driver (vgg_jax.evaluate) and
vgg_jax.predict, which makes the same views for single images, import it, never the other way
round.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from vgg_jax.data import decode, transforms

logger = logging.getLogger(__name__)

# The protocol components: the passes whose views this module makes. vgg_jax.evaluate
# combines them into the protocols (dense+multi_crop is a dense and a multi-crop pass).
SINGLE_CROP, DENSE, MULTI_CROP = "single_crop", "dense", "multi_crop"


# --------------------------------------------------------------------------------------
# Host-side views (uint8 numpy)
# --------------------------------------------------------------------------------------


def dense_shape(height: int, width: int, q: int, image_size: int, step: int) -> tuple[int, int]:
    """The bucket shape (height, width) of an image in dense evaluation at scale q.

    The rescaled shape, rounded down to a multiple of `step` (never below image_size).
    """
    rw, rh = decode.rescaled_size(width, height, q)
    return max(image_size, rh // step * step), max(image_size, rw // step * step)


def fit_to_shape(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Centre-crops a rescaled image to its bucket shape (from `dense_shape`)."""
    if image.shape[0] < shape[0] or image.shape[1] < shape[1]:
        # Cannot happen with decode's own rounding; stretch rather than fail if it does.
        resized = Image.fromarray(image).resize(shape[::-1], decode.RESAMPLE)
        return np.asarray(resized)
    top, left = (image.shape[0] - shape[0]) // 2, (image.shape[1] - shape[1]) // 2
    return image[top : top + shape[0], left : left + shape[1]]


def protocol_views(
    image: np.ndarray, component: str, image_size: int, grid: int = 5, flip: bool = True,
    shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """The net inputs of one image already rescaled to the test scale Q, [V, H, W, 3] uint8.

    Single crop never rescales the whole image: `encoded_image_views` makes it.

    Args:
      image: uint8 [H, W, 3] with shorter side Q.
      component: "dense" (the whole image, cropped to `shape`; its flip is made on the
        device) or "multi_crop" (the grid x grid crops, then their flips when `flip`).
      image_size: the crop side.
      grid: crops per side for multi_crop.
      flip: include flipped multi-crop views.
      shape: the dense bucket shape (default: the image's own).

    Returns:
      1 view for dense, (2 if flip else 1) * grid^2 for multi_crop.
    """
    if component == DENSE:
        return fit_to_shape(image, shape or image.shape[:2])[None]
    if component == MULTI_CROP:
        views = transforms.grid_crops(image, image_size, grid)
        return views if flip else views[: grid * grid]
    raise ValueError(f"Unknown protocol component {component!r}.")


def encoded_image_views(
    data: bytes, component: str, q: int, image_size: int, grid: int = 5, flip: bool = True,
    shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """The net inputs of one encoded image at test scale q, [V, H, W, 3] uint8.

    Single crop is exactly the validation view of training (`transforms.centre_view`: only
    the crop window is resampled), so both report the same error for one checkpoint; the
    other components rescale the whole image first.

    Args:
      data: the encoded image.
      component: "single_crop", "dense" or "multi_crop".
      q: the test scale.
      image_size: the crop side.
      grid: crops per side for multi_crop.
      flip: include flipped multi-crop views.
      shape: the dense bucket shape (default: the rescaled image's own).

    Returns:
      The views, as `protocol_views`.

    Raises:
      One of decode.DECODE_ERRORS for an undecodable image.
    """
    if component == SINGLE_CROP:
        return transforms.centre_view(data, q, image_size)[None]
    image = decode.decode_rescaled(data, q)
    return protocol_views(image, component, image_size, grid, flip, shape)


# --------------------------------------------------------------------------------------
# The images and the batch plan
# --------------------------------------------------------------------------------------


class ArrayImages:
    """An in-memory split in the record format of vgg_jax.data.sources (for tests and tools).

    Arrays are stored PNG-encoded (lossless), so they take the same decoding path as files.

    Args:
      images: uint8 [H, W, 3] arrays of any sizes, or encoded image bytes.
      labels: integer labels.
    """

    def __init__(self, images: Sequence[Any], labels: Sequence[int]):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels.")
        self._images = [x if isinstance(x, bytes) else png_bytes(x) for x in images]
        self._labels = [int(x) for x in labels]

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self._images[index], "label": self._labels[index], "name": f"[{index}]"}

    def __repr__(self) -> str:
        return f"ArrayImages(num_examples={len(self)})"


def png_bytes(array: np.ndarray) -> bytes:
    """Encodes a uint8 image losslessly, so an in-memory image reads like a file.

    Args:
      array: uint8 [H, W, 3] (or [H, W]).

    Returns:
      PNG bytes.
    """
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


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
      budget: config.eval.batch_size.
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
        return np.array(dense_shape(h, w, q, image_size, step), np.int64)

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


@dataclasses.dataclass(frozen=True)
class ViewMaker:
    """Decodes one local image rescaled to Q and makes its views for one protocol pass."""

    source: Any
    global_indices: np.ndarray
    component: str
    q: int
    image_size: int
    grid: int
    flip: bool
    shape: tuple[int, int]

    def num_views(self) -> int:
        if self.component == MULTI_CROP:
            return (2 if self.flip else 1) * self.grid**2
        return 1

    def _example(self, views, mask, row, label) -> dict[str, np.ndarray]:
        return {"views": views, "mask": np.bool_(mask), "row": np.int64(row),
                "label": np.int64(label)}

    def __call__(self, row: int) -> dict[str, np.ndarray]:
        empty = np.zeros((self.num_views(),) + tuple(self.shape) + (3,), np.uint8)
        if row < 0:  # Padding.
            return self._example(empty, False, -1, -1)
        record = self.source[int(self.global_indices[row])]
        try:
            views = encoded_image_views(record["image"], self.component, self.q,
                                        self.image_size, self.grid, self.flip, self.shape)
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
