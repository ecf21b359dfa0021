"""The paper's test protocols (section 3.2), data-parallel, every image counted exactly once.

Protocols, each at one or several test scales Q (the image's shorter side after isotropic
rescaling):

  single_crop       the centre image_size x image_size crop.
  dense             the net run fully-convolutionally over the whole rescaled image (the
                    model's head already is convolutional); its class score map is averaged
                    spatially, turned into a softmax, and averaged with that of the
                    horizontally flipped image.
  multi_crop        a regular grid x grid of image_size crops (5 x 5 in the paper) and their
                    flips: the softmax averaged over the 2 * grid^2 crops.
  dense+multi_crop  the average of the dense and the multi-crop softmax.

Several scales average the softmax over scales; several nets (an ensemble) average the
softmax over nets. Every level averages with equal weights, as the paper does.

Dense evaluation sees whole images of many sizes. To keep the number of XLA compilations
bounded, the rescaled image is centre-cropped to a multiple of `config.eval.dense_size_step`
pixels (32, the net's stride, by default: the pools mostly drop those border pixels anyway)
and images of equal shape are batched together (one bucket per shape). Each bucket compiles
once per net, and its batch is padded to a fixed size, so the last partial batch does not
compile again. The number of compilations is reported with the results.

Exactness on any number of devices and processes: image i belongs to process
i % process_count for every pass, each process pads its share of every bucket to the same
number of batches (padding rows carry mask 0), and the per-image results are only ever
counted on the owning process; counts are summed over processes at the end.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec
from PIL import Image

from vgg_jax import paper_results, parallel
from vgg_jax.config_values import string_list
from vgg_jax.data import transforms
from vgg_jax.models import canonical_version
from vgg_jax.preprocess import normalize_images

logger = logging.getLogger(__name__)

SINGLE_CROP, DENSE, MULTI_CROP = "single_crop", "dense", "multi_crop"
DENSE_MULTI_CROP = "dense+multi_crop"
PROTOCOLS = (SINGLE_CROP, DENSE, MULTI_CROP, DENSE_MULTI_CROP)
# The paper reports top-1 and top-5 error.
TOP_K = 5
# Paper 3.2: multi-scale testing of a fixed-S net uses Q in {S - 32, S, S + 32}.
MULTI_SCALE_OFFSET = 32
RESULTS_BASENAME = "eval_results"
HISTORY_FILENAME = "eval_history.jsonl"
# Data fields that, when they differ from the checkpoint's run, mean another data set.
_DATA_IDENTITY_FIELDS = ("source", "name", "data_dir", "eval_split")


# --------------------------------------------------------------------------------------
# Test scales
# --------------------------------------------------------------------------------------


def test_scales(
    scales: Sequence[int], train_scale_min: int, train_scale_max: int, multi_scale: bool = False
) -> tuple[int, ...]:
    """The test scales Q of the paper's protocols (3.2, 4.1, 4.2).

    Args:
      scales: explicit scales (config.eval.scales); used as given when not empty.
      train_scale_min, train_scale_max: the net's training scale S (equal for fixed S).
      multi_scale: with no explicit scales, the paper's multi-scale set: {S-32, S, S+32}
        for fixed S, {S_min, (S_min+S_max)/2, S_max} ({256, 384, 512}) for jittered S.
        Otherwise the single-scale protocol: Q = S for fixed S, (S_min+S_max)/2 (384)
        for jittered S.

    Returns:
      A tuple of test scales.
    """
    if len(scales):
        return tuple(int(q) for q in scales)
    lo, hi = int(train_scale_min), int(train_scale_max)
    mid = (lo + hi) // 2
    if not multi_scale:
        return (mid,)
    if lo == hi:
        return (lo - MULTI_SCALE_OFFSET, lo, lo + MULTI_SCALE_OFFSET)
    return (lo, mid, hi)


def protocol_components(protocol: str) -> tuple[str, ...]:
    """The passes a protocol needs: ("dense", "multi_crop") for the combined protocol."""
    if protocol not in PROTOCOLS:
        raise ValueError(
            f"Unknown config.eval.protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}."
        )
    return (DENSE, MULTI_CROP) if protocol == DENSE_MULTI_CROP else (protocol,)


# --------------------------------------------------------------------------------------
# Host-side views (uint8 numpy)
# --------------------------------------------------------------------------------------


def dense_shape(height: int, width: int, q: int, image_size: int, step: int) -> tuple[int, int]:
    """The bucket shape (height, width) of an image in dense evaluation at scale q.

    The rescaled shape, rounded down to a multiple of `step` (never below image_size).
    """
    rw, rh = transforms.rescaled_size(width, height, q)
    return max(image_size, rh // step * step), max(image_size, rw // step * step)


def fit_to_shape(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Centre-crops a rescaled image to its bucket shape (from `dense_shape`)."""
    if image.shape[0] < shape[0] or image.shape[1] < shape[1]:
        # Cannot happen with transforms' own rounding; stretch rather than fail if it does.
        resized = Image.fromarray(image).resize(shape[::-1], transforms.RESAMPLE)
        return np.asarray(resized)
    top, left = (image.shape[0] - shape[0]) // 2, (image.shape[1] - shape[1]) // 2
    return image[top : top + shape[0], left : left + shape[1]]


def protocol_views(
    image: np.ndarray, component: str, image_size: int, grid: int = 5, flip: bool = True,
    shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """The net inputs of one image already rescaled to the test scale Q, [V, H, W, 3] uint8.

    Args:
      image: uint8 [H, W, 3] with shorter side Q.
      component: "single_crop" (the centre crop), "dense" (the whole image, cropped to
        `shape`; its flip is made on the device) or "multi_crop" (the grid x grid crops,
        then their flips when `flip`).
      image_size: the crop side.
      grid: crops per side for multi_crop.
      flip: include flipped multi-crop views.
      shape: the dense bucket shape (default: the image's own).

    Returns:
      1 view for single_crop and dense, (2 if flip else 1) * grid^2 for multi_crop.
    """
    if component == DENSE:
        return fit_to_shape(image, shape or image.shape[:2])[None]
    if component == MULTI_CROP:
        views = transforms.grid_crops(image, image_size, grid)
        return views if flip else views[: grid * grid]
    if component == SINGLE_CROP:
        return transforms.centre_crop(image, image_size)[None]
    raise ValueError(f"Unknown protocol component {component!r}.")


# --------------------------------------------------------------------------------------
# Nets and their device functions
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class EvalNet:
    """One net to evaluate: its module, parameters and the preprocessing it was trained with.

    Attributes:
      name: shown in the results table.
      model: the flax module (its image_size is the crop size).
      params: parameters (host or device arrays).
      mean_rgb, std_rgb: the net's input normalisation (0-255 scale).
      train_scale: (S_min, S_max) the net was trained with.
      step: the checkpoint step the parameters come from (None: not from a checkpoint).
      version: the paper's configuration ("A" ... "E", "A_LRN"), for comparisons with the
        paper's tables ("" when unknown).
    """

    name: str
    model: Any
    params: Any
    mean_rgb: Sequence[float]
    std_rgb: Sequence[float] = (1.0, 1.0, 1.0)
    train_scale: tuple[int, int] = (256, 256)
    step: int | None = None
    version: str = ""

    @property
    def train_scale_label(self) -> str:
        lo, hi = self.train_scale
        return str(lo) if lo == hi else f"[{lo};{hi}]"


def class_probabilities(
    model, mean_rgb, std_rgb, flip: bool, params, views: jax.Array
) -> jax.Array:
    """Softmax averaged over an image's views (and their flips): the core of every protocol.

    Args:
      model: the VGG module.
      mean_rgb, std_rgb: input normalisation.
      flip: also run every view flipped horizontally and average the two softmax outputs.
      params: the net's parameters.
      views: uint8 [B, V, H, W, 3]; V crops of one image (V = 1 for single crop and dense),
        each at least image_size on both sides.

    Returns:
      float32 [B, classes]. A view larger than image_size gives a class score map, which is
      averaged spatially before the softmax (dense evaluation, paper 3.2).
    """
    b, v = views.shape[:2]
    x = views.reshape((b * v,) + views.shape[2:])
    x = normalize_images(x, mean_rgb, std_rgb, None, model.dtype)
    if flip:
        # Stacked next to each original so that a device's rows stay on that device.
        x = jnp.stack([x, jnp.flip(x, axis=2)], axis=1).reshape((-1,) + x.shape[1:])
    scores = model.apply({"params": params}, x, train=False, dense=True)
    scores = scores.astype(jnp.float32).mean(axis=(1, 2))
    probs = jax.nn.softmax(scores, axis=-1)
    return probs.reshape(b, -1, probs.shape[-1]).mean(axis=1)


def make_probability_fn(net: EvalNet, flip: bool, mesh) -> Callable:
    """`class_probabilities` for one net, jit-compiled with the batch sharded over 'data'."""
    fn = functools.partial(
        class_probabilities, net.model, tuple(net.mean_rgb), tuple(net.std_rgb), flip
    )
    return jax.jit(fn, out_shardings=parallel.batch_sharded(mesh))


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
        self._images = [x if isinstance(x, bytes) else _png(x) for x in images]
        self._labels = [int(x) for x in labels]

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self._images[index], "label": self._labels[index], "name": f"[{index}]"}

    def __repr__(self) -> str:
        return f"ArrayImages(num_examples={len(self)})"


def _png(array: np.ndarray) -> bytes:
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


@dataclasses.dataclass(frozen=True)
class _ViewMaker:
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
            if self.component == SINGLE_CROP:  # exactly the training loop's validation view
                views = transforms.centre_view(record["image"], self.q, self.image_size)[None]
            else:
                image = transforms.decode_rescaled(record["image"], self.q)
                views = protocol_views(image, self.component, self.image_size, self.grid,
                                       self.flip, self.shape)
        except transforms.DECODE_ERRORS as e:
            logger.warning("Skipping undecodable image %s (%s: %s).",
                           record.get("name", row), e.__class__.__name__, e)
            return self._example(empty, False, row, record["label"])
        return self._example(np.ascontiguousarray(views), True, row, record["label"])


def _batches(maker: _ViewMaker, bucket: Bucket, num_threads: int) -> Iterable[dict]:
    """Batches of views, decoded by grain in background threads, in plan order."""
    import grain

    dataset = grain.MapDataset.source(bucket.rows.tolist()).map(maker).batch(bucket.local_batch)
    if num_threads <= 0:
        return (dataset[i] for i in range(len(dataset)))
    return dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
    )


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


def top_k_correct(probs: np.ndarray, labels: np.ndarray, k: int = TOP_K) -> tuple[int, int]:
    """(top-1 correct, top-k correct) counts of a batch of class probabilities."""
    if len(labels) == 0:
        return 0, 0
    k = min(k, probs.shape[-1])
    top = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    hits = top == labels[:, None]
    return int(hits[:, 0].sum()), int(hits.any(axis=1).sum())


@dataclasses.dataclass
class _Tally:
    top1: int = 0
    top5: int = 0
    count: int = 0

    def add(self, probs: np.ndarray, labels: np.ndarray) -> None:
        t1, t5 = top_k_correct(probs, labels)
        self.top1, self.top5, self.count = self.top1 + t1, self.top5 + t5, self.count + len(labels)


# --------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------


def evaluate_nets(
    nets: Sequence[EvalNet],
    source: Any,
    *,
    protocol: str = SINGLE_CROP,
    scales: Sequence[int],
    batch_size: int = 128,
    multi_crop_grid: int = 5,
    flip: bool = True,
    dense_size_step: int = 32,
    num_threads: int = 4,
    progress_bar: bool = True,
    mesh=None,
    return_probabilities: bool = False,
) -> dict[str, Any]:
    """Evaluates one net or an ensemble on a whole split with a paper protocol.

    Args:
      nets: the nets; with several, their softmax outputs are averaged (an ensemble).
        They must share image_size and the number of classes.
      source: random access to the split: records {"image": encoded bytes, "label": int}
        (vgg_jax.data.sources, or `ArrayImages` for arrays).
      protocol: one of PROTOCOLS.
      scales: test scales Q (each at least image_size); softmax averaged over them.
      batch_size: per global batch, the number of image_size x image_size net inputs
        (crops, flips and dense area count); the images per batch follow from it.
      multi_crop_grid: crops per side of the multi-crop grid.
      flip: average with horizontal flips in dense and multi-crop evaluation (paper: yes).
      dense_size_step: dense views are cropped to multiples of this (bounds compilations).
      num_threads: host threads decoding images (0: in this thread).
      progress_bar: show tqdm progress (process 0 only).
      mesh: the data mesh (default: every device).
      return_probabilities: also return this process's final per-image probabilities.

    Returns:
      {"rows": [result row dicts], "compilations": int, "buckets": {component@Q: count},
       "undecodable": int}; with return_probabilities also "probabilities" [local N, C]
       (the softmax averaged over nets, protocol components and scales: the last row's)
       and "indices" (their global image indices, this process's images only).

    Host memory: with several scales, components or nets, one float32 [images, classes]
    array per net and component is kept (200 MB per array for the 50K ImageNet images on
    one process; divided by the process count on several).
    """
    if not nets:
        raise ValueError("No net to evaluate.")
    image_size = nets[0].model.image_size
    num_classes = nets[0].model.num_classes
    for net in nets[1:]:
        if net.model.image_size != image_size or net.model.num_classes != num_classes:
            raise ValueError(
                f"Ensemble nets must share image_size and num_classes: {nets[0].name} has "
                f"{image_size}/{num_classes}, {net.name} has {net.model.image_size}/"
                f"{net.model.num_classes}."
            )
    components = protocol_components(protocol)
    scales = tuple(int(q) for q in scales)
    if not scales:
        raise ValueError("No test scale given.")
    if min(scales) < image_size:
        raise ValueError(
            f"Test scale Q={min(scales)} is smaller than the crop size {image_size}; "
            "every Q in config.eval.scales must be at least config.data.image_size."
        )
    mesh = mesh if mesh is not None else parallel.create_mesh()
    device_count, process_count = mesh.devices.size, jax.process_count()
    process_index = jax.process_index()
    if device_count % process_count:
        raise ValueError(f"{device_count} devices do not split over {process_count} processes.")

    # Fixed ownership: image i is evaluated (and counted) by process i % process_count.
    global_indices = np.arange(process_index, len(source), process_count)
    num_local = len(global_indices)
    labels = np.full(num_local, -1, np.int64)
    decoded = np.zeros(num_local, bool)

    params = [parallel.replicate(net.params, mesh) for net in nets]
    # Nets with the same module and preprocessing (an ensemble of snapshots of one net)
    # share one jitted function, so they also share its compilations.
    jitted: dict[tuple, Callable] = {}
    fns, fn_keys = {}, {}
    for i, net in enumerate(nets):
        for c in components:
            # Multi-crop flips are made on the host with the crops; dense flips here.
            use_flip = flip and c == DENSE
            key = (net.model, tuple(net.mean_rgb), tuple(net.std_rgb), use_flip)
            if key not in jitted:
                jitted[key] = make_probability_fn(net, use_flip, mesh)
            fns[(i, c)], fn_keys[(i, c)] = jitted[key], key
    # jit compiles each function once per input shape: (function, shape) pairs counted.
    compiled: set[tuple] = set()
    # Softmax sums over scales per (net, component); only kept when rows combine them.
    combine = len(scales) > 1 or len(components) > 1 or len(nets) > 1 or return_probabilities
    sums = {key: np.zeros((num_local, num_classes), np.float32) for key in fns} if combine else {}
    tallies: dict[tuple[int, str, int], _Tally] = {}
    bucket_counts: dict[str, int] = {}
    seen_shape_keys: dict[int, np.ndarray] = {}

    for component in components:
        flips = 2 if flip and component != SINGLE_CROP else 1
        for q in scales:
            if component == DENSE:
                if q not in seen_shape_keys:
                    seen_shape_keys[q] = _gather_dense_keys(
                        source, global_indices, q, image_size, dense_size_step, num_threads,
                        process_count)
                keys = seen_shape_keys[q]
                costs = {
                    (h, w): flips * math.ceil(h * w / image_size**2)
                    for h, w in {tuple(int(v) for v in k) for k in keys.reshape(-1, 2) if k[0] >= 0}
                }
            else:
                views = multi_crop_grid**2 if component == MULTI_CROP else 1
                keys = _uniform_keys(len(source), (image_size, image_size), process_count)
                costs = {(image_size, image_size): views * flips}
            buckets = plan_buckets(keys, costs, batch_size, device_count, process_count)
            bucket_counts[f"{component}@{q}"] = len(buckets)
            for i in range(len(nets)):
                tallies[(i, component, q)] = _Tally()
            total = sum(b.num_batches for b in buckets)
            bar = _progress(total, f"{component} Q={q}", progress_bar and process_index == 0)
            visits = np.zeros(num_local, np.int64)
            for bucket in buckets:
                maker = _ViewMaker(source, global_indices, component, q, image_size,
                                   multi_crop_grid, flip, bucket.shape)
                pending = None
                for batch in _batches(maker, bucket, num_threads):
                    device_batch = parallel.shard_batch({"views": batch["views"]}, mesh)
                    outputs = [fns[(i, component)](params[i], device_batch["views"])
                               for i in range(len(nets))]
                    compiled.update((fn_keys[(i, component)], device_batch["views"].shape)
                                    for i in range(len(nets)))
                    # Fetch the previous batch while this one computes.
                    if pending is not None:
                        _consume(*pending, mesh, component, q, labels, decoded, visits,
                                 tallies, sums)
                    pending = (batch, outputs)
                    bar.update(1)
                if pending is not None:
                    _consume(*pending, mesh, component, q, labels, decoded, visits,
                             tallies, sums)
            bar.close()
            if not np.all(visits == 1):
                raise AssertionError(
                    f"Evaluation plan bug: {int(np.sum(visits != 1))} images were not visited "
                    "exactly once.")

    valid = decoded
    rows, local_counts = _result_rows(nets, components, scales, tallies, sums, labels, valid,
                                      protocol)
    global_counts = _sum_over_processes(np.asarray(local_counts, np.int64))
    for row, (t1, t5, n) in zip(rows, global_counts):
        row["top1_error"] = 100.0 * (1.0 - t1 / n) if n else float("nan")
        row["top5_error"] = 100.0 * (1.0 - t5 / n) if n else float("nan")
        row["images"] = int(n)
    undecodable = int(_sum_over_processes(np.array([num_local - valid.sum()], np.int64))[0])
    compilations = len(compiled)
    result = {"rows": rows, "compilations": compilations, "buckets": bucket_counts,
              "undecodable": undecodable}
    if return_probabilities:
        result["probabilities"] = _final_probabilities(nets, components, scales, sums)
        result["indices"] = global_indices
    return result


def _uniform_keys(total: int, shape: tuple[int, int], process_count: int) -> np.ndarray:
    # Every image has the same view shape; only the per-process counts matter, and those
    # follow from i % process_count, so no communication is needed.
    counts = [len(range(p, total, process_count)) for p in range(process_count)]
    keys = np.full((process_count, max(counts), 2), -1, np.int64)
    for p, n in enumerate(counts):
        keys[p, :n] = shape
    return keys


def _gather_dense_keys(
    source, global_indices: np.ndarray, q: int, image_size: int, step: int, num_threads: int,
    process_count: int,
) -> np.ndarray:
    """Every process's dense view shapes at scale q, [process_count, max_local, 2]."""
    import grain

    def key(index):
        w, h = transforms.image_size(source[int(index)]["image"])
        return np.array(dense_shape(h, w, q, image_size, step), np.int64)

    def safe_key(index):
        try:
            return key(index)
        except transforms.DECODE_ERRORS:
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


def _consume(batch, outputs, mesh, component, q, labels, decoded, visits, tallies, sums):
    rows, mask = batch["row"], batch["mask"]
    real = rows >= 0
    visits[rows[real]] += 1
    labels[rows[real]] = batch["label"][real]
    decoded[rows[mask]] = True
    for i, out in enumerate(outputs):
        probs = np.asarray(
            multihost_utils.global_array_to_host_local_array(out, mesh, PartitionSpec("data")))
        tallies[(i, component, q)].add(probs[mask], batch["label"][mask])
        if sums:
            sums[(i, component)][rows[mask]] += probs[mask]


def _result_rows(nets, components, scales, tallies, sums, labels, valid, protocol):
    """Result rows (without errors yet) and their local (top-1, top-5, count) counts."""
    rows, counts = [], []
    scales_label = ",".join(str(q) for q in scales)
    y = labels[valid]

    def add(net_name, train_s, test_q, proto, tally, members=None):
        members = nets if members is None else members
        rows.append({"net": net_name, "train_S": train_s, "test_Q": test_q, "protocol": proto,
                     "versions": [n.version for n in members]})
        counts.append((tally.top1, tally.top5, tally.count))

    def tally_of(probs):
        t = _Tally()
        t.add(probs[valid], y)
        return t

    def component_mean(i, c):
        return sums[(i, c)] / len(scales)

    for i, net in enumerate(nets):
        for c in components:
            for q in scales:
                add(net.name, net.train_scale_label, str(q), c, tallies[(i, c, q)], [net])
            if len(scales) > 1:
                add(net.name, net.train_scale_label, scales_label, c,
                    tally_of(component_mean(i, c)), [net])
        if len(components) > 1:
            combined = sum(component_mean(i, c) for c in components) / len(components)
            add(net.name, net.train_scale_label, scales_label, protocol, tally_of(combined),
                [net])
    if len(nets) > 1:
        name = " + ".join(net.name for net in nets)
        train_s = ", ".join(net.train_scale_label for net in nets)
        for c in components:
            mean = sum(component_mean(i, c) for i in range(len(nets))) / len(nets)
            add(name, train_s, scales_label, c, tally_of(mean))
        if len(components) > 1:
            mean = sum(
                component_mean(i, c) for i in range(len(nets)) for c in components
            ) / (len(nets) * len(components))
            add(name, train_s, scales_label, protocol, tally_of(mean))
    return rows, counts


def _final_probabilities(nets, components, scales, sums):
    total = sum(sums[(i, c)] for i in range(len(nets)) for c in components)
    return total / (len(nets) * len(components) * len(scales))


def _sum_over_processes(local: np.ndarray) -> np.ndarray:
    if jax.process_count() == 1:
        return local
    return np.asarray(multihost_utils.process_allgather(local)).sum(axis=0)


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False)


# --------------------------------------------------------------------------------------
# Results table
# --------------------------------------------------------------------------------------

TABLE_COLUMNS = (
    ("net", "net"), ("train_S", "train S"), ("test_Q", "test Q"), ("protocol", "protocol"),
    ("top1_error", "top-1 err (%)"), ("top5_error", "top-5 err (%)"), ("images", "images"),
)


# Appended by `format_table(..., with_paper=True)`: the paper's figure for the same setting.
PAPER_COLUMNS = (
    ("paper_table", "paper"), ("paper_top1_error", "paper top-1 (%)"),
    ("paper_top5_error", "paper top-5 (%)"),
)


def format_table(
    rows: Sequence[Mapping[str, Any]], with_paper: bool = True,
    extra_columns: Sequence[tuple[str, str]] = (),
) -> str:
    """The results as a Markdown table in the paper's format.

    Args:
      rows: result rows of `evaluate_nets`.
      with_paper: add the paper's figures for the rows whose setting the paper reports
        (vgg_jax.paper_results; "-" elsewhere).
      extra_columns: more (row key, title) columns at the end.

    Returns:
      The table, one line per row.
    """
    columns = TABLE_COLUMNS
    if with_paper:
        rows, columns = paper_results.compare(rows), TABLE_COLUMNS + PAPER_COLUMNS
    columns = tuple(columns) + tuple(extra_columns)

    def cell(row, key):
        value = row.get(key)
        if value is None:
            return "-"
        if isinstance(value, float):  # the paper prints one decimal
            return f"{value:.1f}" if key.startswith("paper_") else f"{value:.2f}"
        if isinstance(value, (list, tuple)):
            return ",".join(str(v) for v in value)
        return str(value)

    lines = ["| " + " | ".join(title for _, title in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row, key) for key, _ in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(
    workdir: str, result: Mapping[str, Any], extra: Mapping[str, Any]
) -> tuple[str, str]:
    """Writes the newest evaluation into the workdir and appends it to its history.

    eval_results.json and eval_results.md hold the newest evaluation; every evaluation is
    also appended as one line to eval_history.jsonl, so running one protocol after another
    keeps all their rows.

    Args:
      workdir: the run's directory.
      result: what `evaluate_nets` returned.
      extra: more fields to record (split, checkpoints, steps, protocol).

    Returns:
      The paths of eval_results.json and eval_results.md.
    """
    os.makedirs(workdir, exist_ok=True)
    json_path = os.path.join(workdir, RESULTS_BASENAME + ".json")
    md_path = os.path.join(workdir, RESULTS_BASENAME + ".md")
    payload = {key: result[key] for key in ("rows", "compilations", "buckets", "undecodable")}
    payload.update(extra)
    payload["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    with open(json_path, "w") as f:
        json.dump(payload, f, indent=1)
    with open(os.path.join(workdir, HISTORY_FILENAME), "a") as f:
        f.write(json.dumps(payload) + "\n")
    with open(md_path, "w") as f:
        f.write(format_table(result["rows"]) + "\n\n")
        f.write(f"{result['compilations']} compilations; buckets per pass: "
                f"{json.dumps(result['buckets'])}; undecodable images: {result['undecodable']}.\n")
        for key, value in extra.items():
            f.write(f"{key}: {value}\n")
    return json_path, md_path


# --------------------------------------------------------------------------------------
# Entry point (main.py --mode=eval)
# --------------------------------------------------------------------------------------


def load_net(path: str, step: int | str | None = None) -> tuple[EvalNet, ml_collections.ConfigDict]:
    """An EvalNet from a workdir or weight file (see vgg_jax.checkpoint.load_variables)."""
    from vgg_jax import checkpoint, train

    variables, run_config, chosen_step = checkpoint.load_checkpoint(path, step)
    model = train.create_model_from_config(run_config)
    d = run_config.data
    name = f"{run_config.model.version} ({os.path.basename(os.path.normpath(path))})"
    net = EvalNet(
        name=name, model=model, params=variables["params"], mean_rgb=tuple(d.mean_rgb),
        std_rgb=tuple(d.get("std_rgb", (1.0, 1.0, 1.0))),
        train_scale=(int(d.train_scale_min), int(d.train_scale_max)), step=chosen_step,
        version=canonical_version(run_config.model.version),
    )
    return net, run_config


def run_evaluation(
    config: ml_collections.ConfigDict, workdir: str, step: int | str | None = None
) -> list[dict[str, Any]]:
    """Evaluates the workdir's checkpoint (and config.eval.ensemble) on the eval split.

    The nets, their preprocessing and their training scale S come from the checkpoints'
    own configs; the protocol, scales, batch size and data set come from `config`.

    Args:
      config: the run config (config.eval and config.data are read).
      workdir: the run's directory (or a weight file's); results are written here.
      step: checkpoint step (number, "best", "latest"; None: best if any, else latest).

    Returns:
      The result rows (also printed, and written as eval_results.json / .md).
    """
    from vgg_jax.data import sources

    ev = config.eval
    net, run_config = load_net(workdir, step)
    _warn_about_other_data(run_config, config)
    ensemble = string_list(ev.ensemble)
    nets = [net] + [load_net(path)[0] for path in ensemble]
    train_scales = {n.train_scale for n in nets}
    if not ev.scales and len(train_scales) > 1:
        # The paper's test scales follow from S, and every net here sees the same views.
        raise ValueError(
            f"config.eval.ensemble mixes nets trained at different scales S "
            f"{sorted(train_scales)}, so the paper's test scales are ambiguous; set "
            "config.eval.scales explicitly (e.g. --config.eval.scales=256,384,512).")
    scales = test_scales(ev.scales, *net.train_scale, multi_scale=bool(ev.multi_scale))
    source = sources.make_source(config.data, str(config.data.eval_split))
    data_classes = sources.num_classes(config.data)
    for n in nets:
        if n.model.num_classes != data_classes:
            raise ValueError(
                f"Net {n.name} has {n.model.num_classes} classes but the data set "
                f"({config.data.source}: {config.data.get('name', '')}) has {data_classes}; "
                "evaluate it on the data it was trained for.")
    result = evaluate_nets(
        nets, source, protocol=str(ev.protocol), scales=scales,
        batch_size=int(ev.batch_size),
        multi_crop_grid=int(ev.multi_crop_grid), flip=bool(ev.flip),
        dense_size_step=int(ev.dense_size_step),
        # Decoding threads: the workers' budget of training (PIL releases the GIL).
        num_threads=int(config.data.num_workers),
        progress_bar=bool(config.progress_bar),
    )
    table = format_table(result["rows"])
    if jax.process_index() == 0:
        print(table)
        print(f"{result['compilations']} compilations; buckets per pass {result['buckets']}; "
              f"{result['undecodable']} undecodable images.")
        data_name = config.data.name if config.data.source == "tfds" else config.data.data_dir
        extra = {"split": f"{config.data.source}:{data_name or ''}:{config.data.eval_split}",
                 "checkpoints": [workdir, *ensemble], "steps": [n.step for n in nets],
                 "protocol": str(ev.protocol)}
        write_results(workdir, result, extra)
    return result["rows"]


def _warn_about_other_data(run_config: ml_collections.ConfigDict,
                           config: ml_collections.ConfigDict) -> None:
    # The net comes from the checkpoint, the data from the command line: say so when the
    # two name different data, since that is more often a forgotten flag than a choice.
    differences = [
        f"data.{field}={config.data.get(field)!r} (training: {run_config.data.get(field)!r})"
        for field in _DATA_IDENTITY_FIELDS
        if field in run_config.data and config.data.get(field) != run_config.data.get(field)]
    if differences:
        logger.warning("Evaluating on other data than the net was trained on: %s. Pass the "
                       "training run's --config (and data flags) to evaluate on its data.",
                       "; ".join(differences))
