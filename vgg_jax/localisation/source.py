"""A split's images joined with their boxes: the records of localisation's training and tests.

The images come from any classification source (vgg_jax.data.sources: an image folder or
a prepared TFDS set, whose records carry `file_name`), the boxes from either annotation form
(vgg_jax.localisation.annotations), joined by the image's file name without extension.
An image's class is its source's label; of its boxes, those named by its class's synset
are kept, those named by a word instead of a synset (a known fault of the real files) are
taken as its class too (every box of an ILSVRC image is of the image's class), and those
of another class are skipped. Images without a box are left out (ILSVRC annotated only
part of its training images). Every such case is counted and logged.

A record: {"image": bytes, "label": int, "name": str, "boxes": float32 [K, 4] pixel boxes
of the image's class, K >= 1, not yet clipped to the image (Kaggle's rows carry no image
size; `boxes.clip_pixel_boxes` runs where the image is read)}.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from vgg_jax.data import imagenet_classes, sources
from vgg_jax.localisation.annotations import Annotations, image_key
from vgg_jax.localisation.boxes import BOX_SIZE

logger = logging.getLogger(__name__)

WORD_NAMED = "boxes named by a word instead of a synset, given their image's class"
OTHER_CLASS = "boxes of another class than their image's, skipped"
UNMATCHED = "annotated images missing from the split, skipped"
NO_BOX = "images of the split without a box, left out"
# Where a TFDS split's file names are cached (under config.data.cache_dir): reading them
# takes one pass over the split's records.
_KEYS_CACHE_DIR = "localisation_keys"


class LocalisationSource:
    """The images of a split that have boxes, with their boxes (see the module docstring).

    Args:
      images: the split's image source (records {"image", "label", "name"}).
      indices: the source indices of the images kept, in order.
      boxes: float32 [total, 4] the kept images' pixel boxes, concatenated.
      offsets: int64 [len(indices) + 1]: image i's boxes are boxes[offsets[i]:offsets[i+1]].
      faults: what the join skipped or changed (fault -> count), with the annotations'.
    """

    def __init__(self, images: Any, indices: np.ndarray, boxes: np.ndarray,
                 offsets: np.ndarray, faults: dict[str, int]):
        self.images = images
        self._indices = np.asarray(indices, np.int64)
        self._boxes = np.asarray(boxes, np.float32).reshape(-1, BOX_SIZE)
        self._offsets = np.asarray(offsets, np.int64)
        self.faults = dict(faults)

    def __len__(self) -> int:
        return len(self._indices)

    def boxes(self, index: int) -> np.ndarray:
        """The pixel boxes [K, 4] of record `index` (no image is read)."""
        return self._boxes[self._offsets[index] : self._offsets[index + 1]]

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.images[int(self._indices[int(index)])]
        return {**record, "boxes": self.boxes(int(index))}

    def __repr__(self) -> str:
        # Stable: grain compares it when a training iterator's position is restored.
        return (f"LocalisationSource({self.images!r}, images_with_boxes={len(self)}, "
                f"boxes={len(self._boxes)})")


def class_synsets(images: Any) -> list[str]:
    """The synset (or class folder name) of each label of an image source.

    Args:
      images: a FolderSource (its class folders), or a TfdsSource (imagenet2012's WordNet
        ids; other TFDS sets: their label names).

    Returns:
      The name of label i at position i.
    """
    if isinstance(images, sources.FolderSource):
        return list(images.class_names)
    if images.name == "imagenet2012" and imagenet_classes.wordnet_ids():
        return list(imagenet_classes.wordnet_ids())
    import tensorflow_datasets as tfds  # Imported lazily, as in vgg_jax.data.sources.

    info = tfds.builder(images.name, data_dir=images.data_dir).info
    return list(info.features[sources.TFDS_LABEL_KEY].names)


def image_index(images: Any, cache_dir: str | None = None) -> tuple[list[str], np.ndarray]:
    """The join key (`annotations.image_key`) and label of every image of a source.

    A folder lists its files without reading them. A TFDS split's file names live in its
    records, so the first call reads every record once and caches names and labels under
    `cache_dir` (keyed by the source's repr).

    Args:
      images: the image source.
      cache_dir: where a TFDS split's keys are cached (None: not cached).

    Returns:
      (one key per image, int64 labels), in index order.
    """
    if isinstance(images, sources.FolderSource):
        return [image_key(name) for name in images.file_names()], images.labels()
    path = None
    if cache_dir:
        digest = hashlib.sha256(repr(images).encode()).hexdigest()[:16]
        path = os.path.join(os.path.expanduser(cache_dir), _KEYS_CACHE_DIR, f"{digest}.npz")
        if os.path.exists(path):
            with np.load(path) as cached:
                return [str(k) for k in cached["keys"]], cached["labels"]
    logger.info("Reading the file names of %r once (joins its images to their boxes).", images)
    records = (images[i] for i in range(len(images)))
    pairs = [(image_key(r["name"]), int(r["label"])) for r in records]
    keys, labels = [k for k, _ in pairs], np.array([label for _, label in pairs], np.int64)
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.savez(path + ".tmp.npz", keys=np.array(keys), labels=labels)
        os.replace(path + ".tmp.npz", path)
    return keys, labels


def _own_boxes(names: list[str], boxes: np.ndarray, synset: str, all_synsets: set[str],
               faults: collections.Counter) -> np.ndarray:
    """An image's boxes of its own class (word-named ones included), others counted."""
    known = np.array([name in all_synsets for name in names], bool)
    own = np.array([name == synset for name in names], bool)
    faults[WORD_NAMED] += int(np.sum(~known))
    faults[OTHER_CLASS] += int(np.sum(known & ~own))
    return boxes[own | ~known]


def join(images: Any, annotations: Annotations, keys: Sequence[str], labels: np.ndarray,
         synsets: Sequence[str]) -> LocalisationSource:
    """Joins a source's images with their boxes (see the module docstring).

    Args:
      images: the image source.
      annotations: the split's boxes.
      keys, labels: the join key and label of every image (`image_index`).
      synsets: the synset of every label (`class_synsets`).

    Returns:
      The LocalisationSource of the images that keep at least one box; its faults add the
      join's counts to the annotations'. The counts are also logged.
    """
    faults = collections.Counter(annotations.faults)
    all_synsets = set(synsets)
    indices, chunks, offsets = [], [], [0]
    seen = set()
    for index, key in enumerate(keys):
        if key not in annotations.boxes:
            faults[NO_BOX] += 1
            continue
        seen.add(key)
        own = _own_boxes(annotations.names[key], annotations.boxes[key],
                         synsets[int(labels[index])], all_synsets, faults)
        if not len(own):
            faults[NO_BOX] += 1
            continue
        indices.append(index)
        chunks.append(own)
        offsets.append(offsets[-1] + len(own))
    faults[UNMATCHED] += len(set(annotations.boxes) - seen)
    faults = {fault: count for fault, count in faults.items() if count}
    boxes = np.concatenate(chunks) if chunks else np.zeros((0, BOX_SIZE))
    joined = LocalisationSource(images, np.array(indices, np.int64), boxes, np.array(offsets),
                                faults)
    logger.info("%d images with %d boxes joined%s.", len(joined), len(boxes), "".join(
        f"; {count} {fault}" for fault, count in sorted(faults.items())))
    return joined
