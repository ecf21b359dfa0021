"""Small fake data for tests and benchmarks (encoded images, ImageNet-style folders, ILSVRC
tars, in-memory splits) and the plain reference views tests compare the fast paths with."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from vgg_jax.data import decode

# Test images of identity-encoding folders are flat grey levels this far apart, so an
# example is recognisable from any crop of it even after JPEG rounding.
GREY_STEP = 8


def encode(array: np.ndarray, fmt: str = "JPEG", **kwargs: Any) -> bytes:
    """Encodes a uint8 [H, W] or [H, W, 3] array (or CMYK [H, W, 4] with mode='CMYK')."""
    mode = kwargs.pop("mode", None)
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def smooth_image(rng: np.random.Generator, height: int, width: int, cell: int = 8) -> np.ndarray:
    """A photo-like smooth random RGB image: bicubic upsampling of a random grid whose
    cells are `cell` pixels wide."""
    grid = (max(2, height // cell), max(2, width // cell), 3)
    coarse = rng.integers(0, 256, grid, dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))


def write_folder(
    root: str,
    splits: dict[str, int],
    classes: tuple[str, ...] = ("cat", "dog"),
    size: tuple[int, int] = (48, 64),
    grey_ids: bool = False,
    seed: int = 0,
) -> dict[str, list[int]]:
    """Writes root/<split>/<class>/<i>.png (or .jpg) image folders.

    Args:
      root: the folder root.
      splits: images per class of each split, e.g. {"train": 7, "val": 3}.
      classes: the class folder names.
      size: (height, width) of every image.
      grey_ids: if True, image k of a split is a flat lossless PNG of grey level
        k * GREY_STEP (an id readable from any crop); else smooth random JPEGs.
      seed: the random seed of the images.

    Returns:
      For each split, the grey id of every image (in the folder source's order).
    """
    rng = np.random.default_rng(seed)
    ids: dict[str, list[int]] = {}
    for split, per_class in splits.items():
        ids[split] = []
        k = 0
        for cls in classes:
            os.makedirs(os.path.join(root, split, cls), exist_ok=True)
            for i in range(per_class):
                if grey_ids:
                    pixels = np.full((*size, 3), k * GREY_STEP, np.uint8)
                    Image.fromarray(pixels).save(os.path.join(root, split, cls, f"{i:03d}.png"))
                else:
                    pixels = smooth_image(rng, *size)
                    path = os.path.join(root, split, cls, f"{i:03d}.jpg")
                    Image.fromarray(pixels).save(path, quality=95)
                ids[split].append(k)
                k += 1
    return ids


def _tar_bytes(members: dict[str, bytes]) -> bytes:
    """An uncompressed tar archive of the given {name: content} members."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_fake_ilsvrc_tars(
    manual_dir: str,
    synsets: tuple[str, ...] = ("n01440764", "n01443537"),
    train_per_class: int = 2,
    num_val: int = 3,
    size: tuple[int, int] = (48, 64),
    seed: int = 0,
) -> None:
    """Writes tiny ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar into manual_dir.

    The layout of the real archives, as TFDS's imagenet2012 builder reads them: the train
    tar holds one `<wnid>.tar` per class, each holding `<wnid>_<i>.JPEG`; the val tar holds
    `ILSVRC2012_val_<8 digits>.JPEG` (labelled by TFDS's bundled list, in name order).

    Args:
      manual_dir: the directory to write into (created if missing).
      synsets: the WordNet ids of the training classes (must be ImageNet's).
      train_per_class: images per training class.
      num_val: validation images (ILSVRC2012_val_00000001.JPEG, ...).
      size: (height, width) of every image (smooth random JPEGs).
      seed: the random seed of the images.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(manual_dir, exist_ok=True)

    def jpeg() -> bytes:
        return encode(smooth_image(rng, *size), "JPEG", quality=90)

    train = {
        f"{synset}.tar": _tar_bytes({f"{synset}_{i}.JPEG": jpeg() for i in range(train_per_class)})
        for synset in synsets
    }
    val = {f"ILSVRC2012_val_{i:08d}.JPEG": jpeg() for i in range(1, num_val + 1)}
    with open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "wb") as f:
        f.write(_tar_bytes(train))
    with open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "wb") as f:
        f.write(_tar_bytes(val))


def grey_id(image: np.ndarray) -> int:
    """The id of a crop of a `write_folder(grey_ids=True)` image."""
    return round(float(image.mean()) / GREY_STEP)



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


def rescale_shorter_side(image: np.ndarray, q: int) -> np.ndarray:
    """Isotropically rescales an image so that its shortest side is q (dense evaluation).

    The reference implementation of the dense view on an already decoded array: evaluation
    itself decodes straight to the test scale with `decode.decode_rescaled`, and the tests
    compare that, `transforms.centre_view` and dense evaluation against this plain PIL
    rescale.

    Args:
      image: uint8 [H, W, 3].
      q: the test scale Q.

    Returns:
      uint8 [H', W', 3] with min(H', W') == q.
    """
    height, width = image.shape[:2]
    size = decode.rescaled_size(width, height, q)
    if size == (width, height):
        return np.asarray(image, np.uint8)
    return np.asarray(Image.fromarray(np.asarray(image, np.uint8)).resize(size, decode.RESAMPLE))


def centre_crop(image: np.ndarray, crop_size: int) -> np.ndarray:
    """The central crop_size x crop_size window of an [H, W, C] image (H, W >= crop_size).

    The plain rescale-then-crop that `transforms.centre_view` computes without building the rescaled
    image; tests compare the two.
    """
    height, width = image.shape[:2]
    top, left = (height - crop_size) // 2, (width - crop_size) // 2
    return image[top : top + crop_size, left : left + crop_size]
