"""Appendix B's image descriptor, computed with the dense evaluation's plan.

For each test scale Q the image is rescaled isotropically to shorter side Q and the net
runs fully convolutionally over all of it (the head is already convolutional, models/vgg.py);
the penultimate layer's map (fc7, after its ReLU: the 4096-D features of the paper's nets)
is averaged over its positions, and over the horizontally flipped image. The per-scale
descriptors are kept unnormalised, [images, scales, features], so that averaging and
stacking over scales (classify.py) both come from one computation, and are cached on disk:
a second SVM fit reads them back in a second.

The views, shape buckets and padded batches are those of the dense evaluation
(vgg_jax.evaluation.plan); only the device function differs (features, not class scores).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vgg_jax.data.transforms import DENSE
from vgg_jax.evaluation import plan
from vgg_jax.evaluation.evaluator import EvalNet
from vgg_jax.evaluation.protocols import Protocol
from vgg_jax.preprocess import normalize_images
from vgg_jax.runtime import parallel

logger = logging.getLogger(__name__)

# The penultimate layer, as VGG(outputs=...) names it.
PENULTIMATE = "fc7"


def dense_features(model, mean_rgb, std_rgb, flip: bool, layer: str, variables, views):
    """One descriptor per image: `layer`'s map averaged over positions (and the flip).

    Args:
      model: the VGG module.
      mean_rgb, std_rgb: the net's input normalisation.
      flip: also run the mirrored image and average the two.
      layer: the activation to pool (a name from `model.feature_names`).
      variables: the net's variables (batch norm uses its running averages).
      views: uint8 [B, 1, H, W, 3], the dense views of one bucket.

    Returns:
      float32 [B, features].
    """
    b = views.shape[0]
    x = normalize_images(views.reshape((-1,) + views.shape[2:]), mean_rgb, std_rgb, None,
                         model.dtype)
    if flip:
        x = jnp.stack([x, jnp.flip(x, axis=2)], axis=1).reshape((-1,) + x.shape[1:])
    maps = model.apply(variables, x, train=False, dense=True, outputs=(layer,))[layer]
    pooled = maps.astype(jnp.float32).mean(axis=(1, 2))
    return pooled.reshape(b, -1, pooled.shape[-1]).mean(axis=1)


def compute(net: EvalNet, source: Any, scales: Sequence[int], *, flip: bool = True,
            layer: str = PENULTIMATE, batch_size: int = 32, dense_size_step: int = 32,
            num_threads: int = 4, mesh=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-scale descriptors of every image of a split.

    Args:
      net: the net and its preprocessing (vgg_jax.evaluation.run.load_net).
      source: the split (records with "image" bytes).
      scales: the test scales Q, each at least the net's crop size.
      flip: average with the horizontally flipped image (the paper: yes).
      layer: the pooled layer (default the penultimate, fc7).
      batch_size: net inputs of image_size^2 per global batch (area and flips count).
      dense_size_step: dense views are cropped to multiples of this (bounds compilations).
      num_threads: decoding threads.
      mesh: the data mesh (default: every device).

    Returns:
      (float32 [images, scales, features], int64 [images] labels, bool [images]: decoded).
      Undecodable images are zeros, label -1 and False.

    Raises:
      ValueError: for a scale below the crop size, or on several processes.
    """
    if jax.process_count() > 1:
        raise ValueError("Descriptors are computed on one host; run the command on one process.")
    image_size = net.model.image_size
    if min(scales) < image_size:
        raise ValueError(f"Test scale Q={min(scales)} is smaller than the net's crop size "
                         f"{image_size}; pass scales of at least {image_size} (the paper: "
                         "256,384,512 for 224 crops).")
    mesh = mesh if mesh is not None else parallel.create_mesh()
    fn = jax.jit(functools.partial(dense_features, net.model, tuple(net.mean_rgb),
                                   tuple(net.std_rgb), flip, layer),
                 out_shardings=parallel.batch_sharded(mesh))
    variables = parallel.replicate(net.variables, mesh)
    indices = plan.local_indices(len(source), 0, 1)
    out, decoded = None, np.zeros(len(source), bool)
    labels = np.full(len(source), -1, np.int64)
    for s, q in enumerate(scales):
        protocol = Protocol(DENSE, (q,), flip=flip, dense_size_step=dense_size_step)
        keys = plan.pass_keys(source, indices, protocol, DENSE, q, image_size, num_threads, 1)
        shapes = {tuple(int(v) for v in k) for k in keys.reshape(-1, 2) if k[0] >= 0}
        costs = {shape: protocol.cost(DENSE, shape, image_size) for shape in shapes}
        for bucket in plan.plan_buckets(keys, costs, batch_size, mesh.devices.size, 1):
            maker = plan.ViewMaker(source, indices, protocol, DENSE, q, image_size, bucket.shape)
            for batch in plan.view_batches(maker, bucket, num_threads):
                views = parallel.shard_batch({"views": batch["views"]}, mesh)["views"]
                features = np.asarray(jax.device_get(fn(variables, views)))
                if out is None:
                    out = np.zeros((len(source), len(scales), features.shape[-1]), np.float32)
                rows, mask = batch["row"], batch["mask"]
                out[rows[mask], s] = features[mask]
                decoded[rows[mask]] = True
                labels[rows[mask]] = batch["label"][mask]
        logger.info("Descriptors at Q=%d: %d images.", q, int(decoded.sum()))
    return out, labels, decoded


def cache_path(directory: str, split: str, key: dict[str, Any]) -> str:
    """Where one split's descriptors are cached: named by a hash of what they depend on.

    Args:
      directory: the cache directory.
      split: the split's name (part of the file name, for people).
      key: everything the descriptors depend on (checkpoint, step, data, scales, flip, layer).

    Returns:
      The .npz path.
    """
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() else "_" for c in split)
    return os.path.join(directory, f"{safe}-{digest}.npz")


def load_or_compute(path: str, compute_fn) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Reads cached descriptors, or computes and caches them.

    Args:
      path: from `cache_path`.
      compute_fn: () -> (descriptors, labels, decoded) when not cached.

    Returns:
      (descriptors, labels, decoded, whether they came from the cache).
    """
    if os.path.exists(path):
        with np.load(path) as cached:
            return cached["descriptors"], cached["labels"], cached["decoded"], True
    descriptors, labels, decoded = compute_fn()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = path + ".partial.npz"
    np.savez(partial, descriptors=descriptors, labels=labels, decoded=decoded)
    os.replace(partial, path)  # a killed run never leaves a cache file half written
    return descriptors, labels, decoded, False
