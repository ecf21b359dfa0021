"""Per-image transforms of the paper's training (3.1) and testing (3.2), on PIL and numpy.

Training: isotropic rescale to shortest side S (fixed, or uniform per image in
[train_scale_min, train_scale_max]), one random image_size crop, random horizontal flip,
and AlexNet's PCA colour shift. This module draws those random choices; the pixels come
from vgg_jax.data.decode, whose fast path (`decode.resample_crop`) decodes at reduced DCT
scale and resamples only the crop window, never the whole rescaled image. This module
imports `decode`, never the other way round.

Mean-RGB subtraction is NOT done here: images leave the pipeline as uint8 (4x less host
memory and host-to-device traffic than float32) together with the per-image colour shift
`rgb_shift` (float32, 0-255 units), and the train step computes
`image.astype(float32) - mean_rgb + rgb_shift` on the device
(vgg_jax.preprocess.normalize_images).

Evaluation views (the centre crop, the whole rescaled image cropped to its dense bucket
shape, the grid of crops and their flips) are plain numpy functions; `image_views` makes the
views of one protocol component from an encoded image, for `vgg_jax.evaluation` (which runs
training's validation too) and `vgg_jax.predict` alike.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from vgg_jax.config_values import require
from vgg_jax.data import decode

logger = logging.getLogger(__name__)
# The protocol components (paper 3.2) whose views this module makes; vgg_jax.evaluation
# combines them into protocols (dense+multi_crop is a dense and a multi-crop pass).
SINGLE_CROP, DENSE, MULTI_CROP = "single_crop", "dense", "multi_crop"
# Training examples carry why their file could not be decoded (empty bytes when it could);
# the pipeline turns it into one warning per file and removes the key from the batch.
DECODE_ERROR_KEY = "decode_error"
# The per-image colour shift of a training example (0-255 units).
RGB_SHIFT_KEY = "rgb_shift"


# --------------------------------------------------------------------------------------
# Training augmentation
# --------------------------------------------------------------------------------------


def check_config(data_config: Any) -> None:
    """Raises ConfigError for a bad augmentation or view field of config.data (scales,
    colour shift); part of `pipeline.check_config`."""
    d = data_config
    require(d.train_scale_min <= d.train_scale_max,
            f"config.data.train_scale_min={d.train_scale_min} exceeds train_scale_max="
            f"{d.train_scale_max}; set min <= max (equal for single-scale training).")
    require(d.train_scale_min >= d.image_size,
            f"config.data.train_scale_min={d.train_scale_min} is smaller than the crop "
            f"config.data.image_size={d.image_size}; a crop cannot be larger than the "
            "rescaled image, so raise the scale or lower the crop.")
    require(d.colour_shift_std >= 0,
            f"config.data.colour_shift_std={d.colour_shift_std} must be >= 0 (0 turns the "
            "colour shift off; the paper: 0.1).")


def single_test_scale(scale_min: int, scale_max: int) -> int:
    """The paper's single test scale Q of a net trained at scale S (3.2): the scale of
    training's validation, and of `--mode=eval` without config.eval.scales.

    Args:
      scale_min, scale_max: the training scale's range (config.data.train_scale_min and
        train_scale_max; equal for fixed S).

    Returns:
      Q = S for fixed S; the middle of [S_min, S_max] for jittered S (384 for [256, 512]).
    """
    return (int(scale_min) + int(scale_max)) // 2


def sample_scale(rng: np.random.Generator, scale_min: int, scale_max: int) -> int:
    """Training scale S: fixed when scale_min == scale_max, else uniform integer in range."""
    if scale_min == scale_max:
        return int(scale_min)
    return int(rng.integers(scale_min, scale_max + 1))


def sample_crop_corner(
    rng: np.random.Generator, width: int, height: int, scale: int, crop_size: int
) -> tuple[int, int]:
    """A uniformly random crop corner (left, top) in the image rescaled to `scale`."""
    rw, rh = decode.rescaled_size(width, height, scale)
    return int(rng.integers(0, rw - crop_size + 1)), int(rng.integers(0, rh - crop_size + 1))


def pca_colour_shift(
    rng: np.random.Generator,
    std: float,
    eigenvalues: Sequence[float],
    eigenvectors: Sequence[Sequence[float]],
    pixel_scale: float = 255.0,
) -> np.ndarray:
    """AlexNet's PCA colour augmentation: one RGB offset added to every pixel of an image.

    shift = V @ (alpha * lambda), alpha ~ N(0, std^2) per component, where lambda and the
    columns of V are the eigenvalues and eigenvectors of the RGB pixel covariance.

    Args:
      rng: the per-image generator.
      std: the standard deviation of alpha; 0 gives zeros.
      eigenvalues: lambda, 3 values, in the units of the pixels they came from (0-1).
      eigenvectors: V as rows of a 3x3 matrix whose columns are the eigenvectors.
      pixel_scale: multiplies the shift into pixel units (255 for 0-1 statistics).

    Returns:
      float32 [3], in 0-255 units.
    """
    if std == 0:
        return np.zeros(3, np.float32)
    alpha = rng.normal(0.0, std, size=3)
    shift = np.asarray(eigenvectors, np.float64) @ (alpha * np.asarray(eigenvalues, np.float64))
    return (shift * pixel_scale).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class CropPlacement:
    """Where a training crop came from, for what moves with the pixels (boxes).

    Attributes:
      width, height: the source image's size.
      rescaled_width, rescaled_height: its size rescaled to the training scale S.
      left, top: the crop's corner in the rescaled image.
      size: the crop's side.
      flip: the crop was mirrored horizontally.
    """

    width: int
    height: int
    rescaled_width: int
    rescaled_height: int
    left: int
    top: int
    size: int
    flip: bool


def failure_note(name: str, error: Exception) -> str:
    """The one-line account of an undecodable file: its name and the decoder's error."""
    return f"{name} ({error.__class__.__name__}: {error})"


def _example(
    image: np.ndarray, label: int, rgb_shift: np.ndarray | None, mask: bool
) -> dict[str, Any]:
    return {
        "image": image,
        "label": np.int32(label),
        "rgb_shift": np.zeros(3, np.float32) if rgb_shift is None else rgb_shift,
        "mask": np.bool_(mask),
    }


class TrainAugmentation:
    """The paper's training augmentation (3.1) of one record: the training stream
    (`train_stream.TrainBatches`) writes each image of a batch into its slot with
    `augment_into`; `augment` gives one record on its own (tests, benchmarks).

    Output: {"image": uint8 [size, size, 3], "label": int32, "rgb_shift": float32 [3]
    (0-255 units, zeros when disabled), "mask": bool (False for an undecodable file,
    whose image is zeros), DECODE_ERROR_KEY: bytes (empty, or the `failure_note` of an
    undecodable file)}. It does not log: a worker decodes ahead of what training
    consumes and may decode a file once per epoch and per worker, so the pipeline warns
    where batches are consumed, once per file (vgg_jax.data.pipeline).

    Args:
      data_config: config.data (image_size, train_scale_min/max, random_flip,
        colour_shift_std, pca_eigenvalues, pca_eigenvectors).
    """

    def __init__(self, data_config: Any):
        # Plain values only: the transform is pickled into every worker process.
        self.crop_size = int(data_config.image_size)
        self.scale_min = int(data_config.train_scale_min)
        self.scale_max = int(data_config.train_scale_max)
        self.random_flip = bool(data_config.random_flip)
        self.colour_shift_std = float(data_config.colour_shift_std)
        self.eigenvalues = tuple(float(v) for v in data_config.pca_eigenvalues)
        self.eigenvectors = tuple(
            tuple(float(v) for v in row) for row in data_config.pca_eigenvectors)

    def augment(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """One record augmented.

        Args:
          element: {"image": encoded bytes, "label", "name"}.
          rng: the record's own generator.

        Returns:
          The output record described above.
        """
        image = np.empty((self.crop_size, self.crop_size, 3), np.uint8)
        rgb_shift, note = self.augment_into(element["image"], element["name"], rng, image)
        return {**_example(image, element["label"], rgb_shift, not note),
                DECODE_ERROR_KEY: np.bytes_(note)}

    def augment_into(
        self, data: bytes, name: str, rng: np.random.Generator, out: np.ndarray
    ) -> tuple[np.ndarray, bytes]:
        """Augments one encoded image into `out` (the batch's slot for it).

        Args:
          data: the encoded image.
          name: its file name, for the note of an undecodable file.
          rng: this image's own generator (derived from the seed and the image's position
            in the stream), so the draws never depend on other images or on workers.
          out: uint8 [image_size, image_size, 3], overwritten: the crop, or zeros when the
            file cannot be decoded.

        Returns:
          (rgb_shift float32 [3] in 0-255 units, zeros for an undecodable file; b"", or
          the `failure_note` of an undecodable file, UTF-8).
        """
        rgb_shift, note, _ = self.augment_placed(data, name, rng, out)
        return rgb_shift, note

    def augment_placed(
        self, data: bytes, name: str, rng: np.random.Generator, out: np.ndarray
    ) -> tuple[np.ndarray, bytes, CropPlacement | None]:
        """`augment_into`, also telling where the crop came from.

        Returns:
          (rgb_shift, note) as `augment_into`, and the crop's CropPlacement (None for an
          undecodable file).
        """
        scale = sample_scale(rng, self.scale_min, self.scale_max)
        # Drawn even when flipping is off, so that switching it changes nothing else.
        flip = bool(rng.integers(0, 2)) and self.random_flip
        rgb_shift = pca_colour_shift(
            rng, self.colour_shift_std, self.eigenvalues, self.eigenvectors
        )
        try:
            width, height = decode.image_size(data)
            left, top = sample_crop_corner(rng, width, height, scale, self.crop_size)
            decode.resample_crop(data, scale, left, top, self.crop_size, flip, out=out)
        except decode.DECODE_ERRORS as e:
            out[...] = 0
            return np.zeros(3, np.float32), failure_note(name, e).encode(
                "utf-8", "backslashreplace"), None
        placement = CropPlacement(width, height, *decode.rescaled_size(width, height, scale),
                                  left, top, self.crop_size, flip)
        return rgb_shift, b"", placement

    def augment_example(
        self, record: dict[str, Any], rng: np.random.Generator, out: np.ndarray
    ) -> dict[str, Any]:
        """Augments one record into `out` and returns the example's other entries.

        The training stream (vgg_jax.data.train_stream) calls this for every example and
        stacks each entry over the batch; a task whose examples carry more than the image
        and its label (localisation's box targets) overrides it.

        Args:
          record: {"image": bytes, "label": int, "name": str, ...} from the source.
          rng: this example's own generator.
          out: the batch's slot for its image (see `augment_into`).

        Returns:
          {RGB_SHIFT_KEY: float32 [3], DECODE_ERROR_KEY: bytes} (see `augment_into`).
        """
        rgb_shift, note = self.augment_into(record["image"], record["name"], rng, out)
        return {RGB_SHIFT_KEY: rgb_shift, DECODE_ERROR_KEY: note}


def centre_view(data: bytes, scale: int, crop_size: int) -> np.ndarray:
    """The single-crop test view: the image rescaled to shortest side `scale`, its centre
    crop_size x crop_size window (only that window is resampled).

    Validation during training and `--mode=eval`'s single-crop protocol both use it, so
    the two report the same error for the same checkpoint.

    Args:
      data: encoded image bytes.
      scale: the test scale Q.
      crop_size: the crop side (config.data.image_size).

    Returns:
      uint8 [crop_size, crop_size, 3].

    Raises:
      One of decode.DECODE_ERRORS for an undecodable image.
    """
    rw, rh = decode.rescaled_size(*decode.image_size(data), scale)
    left, top = (rw - crop_size) // 2, (rh - crop_size) // 2
    return decode.resample_crop(data, scale, left, top, crop_size)


# --------------------------------------------------------------------------------------
# Evaluation views on decoded images (numpy in, numpy out)
# --------------------------------------------------------------------------------------


def grid_offsets(length: int, crop_size: int, grid: int) -> np.ndarray:
    """`grid` evenly spaced crop offsets along a side of `length`, first 0, last length-crop."""
    return np.round(np.linspace(0, length - crop_size, grid)).astype(int)


def grid_crops(image: np.ndarray, crop_size: int, grid: int) -> np.ndarray:
    """The paper's multi-crop views of one rescaled image: a grid x grid regular grid of crops
    and their horizontal flips.

    Args:
      image: uint8 [H, W, 3], already rescaled to the test scale (H, W >= crop_size).
      crop_size: the crop side (image_size).
      grid: crops per side (5 in the paper, 5 x 5 x 2 = 50 views).

    Returns:
      uint8 [2 * grid * grid, crop_size, crop_size, 3]: the grid crops in row-major order
      (top row first, left to right), then the same crops flipped horizontally.
    """
    height, width = image.shape[:2]
    if min(height, width) < crop_size:
        raise ValueError(f"Image {height}x{width} is smaller than the crop {crop_size}.")
    crops = np.stack(
        [
            image[top : top + crop_size, left : left + crop_size]
            for top in grid_offsets(height, crop_size, grid)
            for left in grid_offsets(width, crop_size, grid)
        ]
    )
    return np.concatenate([crops, crops[:, :, ::-1]])


def dense_shape(height: int, width: int, q: int, image_size: int, step: int) -> tuple[int, int]:
    """The bucket shape (height, width) of an image in dense evaluation at scale q.

    Args:
      height, width: the image's size before rescaling.
      q: the test scale.
      image_size: the crop side (the smallest shape).
      step: shapes are multiples of it (config.eval.dense_size_step), bounding compilations.

    Returns:
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

    Single crop never rescales the whole image: `image_views` makes it.

    Args:
      image: uint8 [H, W, 3] with shorter side Q.
      component: DENSE (the whole image, cropped to `shape`; its flip is made on the
        device) or MULTI_CROP (the grid x grid crops, then their flips when `flip`).
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
        views = grid_crops(image, image_size, grid)
        return views if flip else views[: grid * grid]
    raise ValueError(f"Unknown protocol component {component!r}.")


def image_views(
    data: bytes, component: str, q: int, image_size: int, grid: int = 5, flip: bool = True,
    shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """The net inputs of one encoded image at test scale q, [V, H, W, 3] uint8.

    Single crop is `centre_view` (only the crop window is resampled), the view of
    training's validation; the other components rescale the whole image first.

    Args:
      data: the encoded image.
      component: SINGLE_CROP, DENSE or MULTI_CROP.
      q: the test scale.
      image_size: the crop side.
      grid: crops per side for multi_crop.
      flip: include flipped multi-crop views.
      shape: the dense bucket shape (default: the rescaled image's own).

    Returns:
      The views, as `protocol_views` (one for single crop).

    Raises:
      One of decode.DECODE_ERRORS for an undecodable image.
    """
    if component == SINGLE_CROP:
        return centre_view(data, q, image_size)[None]
    image = decode.decode_rescaled(data, q)
    return protocol_views(image, component, image_size, grid, flip, shape)
