"""Photo-like JPEG folders: crops of the real photos scikit-learn and matplotlib install.

Random 4:3 crops of real photos, shrunk to the asked size and mirrored at random, have
real photos' statistics (edges, textures, flat areas), so JPEG decoding costs what it
costs on ImageNet's photos; random-noise or flat images would not.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

# ImageNet's typical photo: 500x375 (width x height), saved at JPEG quality 90.
PHOTO_SIZE = (375, 500)
JPEG_QUALITY = 90
# A crop keeps at least this fraction of the photo's side, so that it is downscaled to
# the target size (keeping a photo's detail per pixel), never upscaled.
MIN_CROP_FRACTION = 0.6


def real_photos() -> list[np.ndarray]:
    """The real photos installed with scikit-learn (2) and matplotlib (1), RGB uint8."""
    from matplotlib import cbook
    from sklearn.datasets import load_sample_images

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = np.asarray(Image.open(f).convert("RGB"))
    return [*load_sample_images().images, hopper]


def photo_crop(photos: list[Image.Image], index: int, size: tuple[int, int],
               rng: np.random.Generator) -> Image.Image:
    """A random crop of photo `index % len(photos)` with the aspect of `size`, resized to it.

    Args:
      photos: the source photos.
      index: which photo (cycled).
      size: (height, width) of the result.
      rng: the random generator (window and mirror).

    Returns:
      The crop, mirrored with probability 1/2.
    """
    photo = photos[index % len(photos)]
    height, width = size
    aspect = width / height
    crop_w = min(photo.width, round(photo.height * aspect))
    crop_w = int(rng.integers(round(crop_w * MIN_CROP_FRACTION), crop_w + 1))
    crop_h = min(photo.height, round(crop_w / aspect))
    left = int(rng.integers(0, photo.width - crop_w + 1))
    top = int(rng.integers(0, photo.height - crop_h + 1))
    image = photo.resize((width, height), Image.Resampling.BICUBIC,
                         box=(left, top, left + crop_w, top + crop_h))
    if rng.integers(0, 2):
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def write_photo_folder(root: str, splits: dict[str, int], num_classes: int = 2,
                       size: tuple[int, int] = PHOTO_SIZE, seed: int = 0) -> list[str]:
    """Writes root/<split>/class<k>/<i>.JPEG photo crops, images spread over the classes.

    Args:
      root: the folder root.
      splits: images of each split, e.g. {"train": 2048, "val": 256}.
      num_classes: class folders per split (image i goes to class i % num_classes).
      size: (height, width) of every image.
      seed: the random seed of the crops.

    Returns:
      The paths written.
    """
    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(p) for p in real_photos()]
    paths = []
    for split, count in splits.items():
        for i in range(count):
            class_dir = os.path.join(root, split, f"class{i % num_classes}")
            os.makedirs(class_dir, exist_ok=True)
            paths.append(os.path.join(class_dir, f"{i:06d}.JPEG"))
            photo_crop(photos, i, size, rng).save(paths[-1], "JPEG", quality=JPEG_QUALITY)
    return paths
