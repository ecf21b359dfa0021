"""Per-image transforms of the paper's training (3.1) and testing (3.2), on PIL and numpy.

Training: isotropic rescale to shortest side S (fixed, or uniform per image in
[train_scale_min, train_scale_max]), one random image_size crop, random horizontal flip,
and AlexNet's PCA colour shift. The fast path never builds the rescaled image: the crop
window is mapped back to source pixels and only that window is resampled (OpenCV's
bilinear `cv2.warpAffine`, sub-pixel placement, ~2.4x faster than PIL's `Image.resize(...,
box=...)`; not antialiased, which the reduced-scale decode below makes unnecessary: the
window is then less than twice the crop, and PIL takes over when it is not). JPEGs are
decoded by libjpeg-turbo through simplejpeg (same pixels as PIL's decoder, ~25% faster),
at 1/2, 1/4 or 1/8 scale when the JPEG is at least twice the needed size; CMYK JPEGs, PNGs
and anything simplejpeg rejects go through PIL (`Image.draft` for the reduced scale).
The result matches PIL's rescale-then-crop to within resampling differences (below 1
grey level mean on smooth images; tests/test_data_transforms.py).

Mean-RGB subtraction is NOT done here: images leave the pipeline as uint8 (4x less host
memory and host-to-device traffic than float32) together with the per-image colour shift
`rgb_shift` (float32, 0-255 units), and the train step computes
`image.astype(float32) - mean_rgb + rgb_shift` on the device.

Evaluation views (centre crop, whole rescaled image, grid of crops) are plain numpy
functions, plus the grain transform `EvalTransform` for the validation pipeline.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from typing import Any

import cv2
import grain
import numpy as np
import simplejpeg
from PIL import Image

logger = logging.getLogger(__name__)

# One thread per process: grain's workers are processes, one per core; OpenCV's own thread
# pool would oversubscribe the cores (and a 224x224 resample is too small to split).
cv2.setNumThreads(1)

# Resampling filter of every rescale (antialiased when shrinking, like torchvision's).
RESAMPLE = Image.Resampling.BILINEAR
# libjpeg's DCT scaling can only shrink by these factors; draft() picks the largest one
# that still leaves the image at least as large as requested.
MIN_DRAFT_FACTOR = 2
DRAFT_FACTORS = (8, 4, 2)
# JPEG colour spaces that simplejpeg converts to RGB exactly as PIL does (tested). CMYK and
# YCCK (Adobe files, often stored inverted) are left to PIL, which knows those quirks.
_SIMPLEJPEG_COLOURSPACES = ("YCbCr", "Gray", "RGB")
_JPEG_SOI = b"\xff\xd8\xff"
# Modes that resample correctly as they are; others (CMYK, palette, alpha, 16-bit) are
# converted to RGB before resampling.
_RESAMPLABLE_MODES = ("RGB", "L")


# --------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------


def rescaled_size(width: int, height: int, scale: int) -> tuple[int, int]:
    """The size of an image isotropically rescaled so that its shortest side is `scale`.

    Args:
      width, height: the source size.
      scale: the target shortest side (S or Q).

    Returns:
      (width, height) after rescaling; the shorter one equals `scale` exactly.
    """
    if width <= height:
        return scale, max(scale, round(height * scale / width))
    return max(scale, round(width * scale / height)), scale


def source_box(
    width: int, height: int, scale: int, left: int, top: int, crop_size: int
) -> tuple[float, float, float, float]:
    """Maps a crop of the rescaled image back to a box in source pixels.

    With per-axis factors equal to those of a full `resize(rescaled_size(...))`, resampling
    just this box to crop_size x crop_size samples the same points as rescale-then-crop.

    Args:
      width, height: the source size.
      scale: the shortest side of the (virtual) rescaled image.
      left, top: the crop's corner in rescaled pixels.
      crop_size: the crop's side in rescaled pixels.

    Returns:
      (left, upper, right, lower) in source pixels, floats, for `Image.resize(box=...)`.
    """
    rw, rh = rescaled_size(width, height, scale)
    fx, fy = width / rw, height / rh
    return (left * fx, top * fy, (left + crop_size) * fx, (top + crop_size) * fy)


# --------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------


def open_image(data: bytes) -> Image.Image:
    """Opens encoded image bytes lazily (header only); the format comes from the content."""
    return Image.open(io.BytesIO(data))


def _jpeg_header(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG that simplejpeg decodes exactly as PIL would, else None.

    None sends the file to PIL: not a JPEG, CMYK/YCCK, an unreadable header, or more
    pixels than PIL's decompression-bomb limit (PIL then warns or refuses, as before).
    """
    if bytes(data[:3]) != _JPEG_SOI:
        return None
    try:
        height, width, colourspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    limit = Image.MAX_IMAGE_PIXELS
    if colourspace not in _SIMPLEJPEG_COLOURSPACES or (limit and width * height > limit):
        return None
    return width, height


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an encoded image, from its header only."""
    size = _jpeg_header(data)
    if size is not None:
        return size
    with open_image(data) as image:
        return image.size


def decode_factor(width: int, height: int, needed: tuple[int, int]) -> int:
    """The JPEG DCT scaling factor (1, 2, 4 or 8) for decoding a width x height JPEG that
    must stay at least `needed` (width, height): the largest power of two that fits, the
    rule of PIL's `draft()`. 1 unless the JPEG is MIN_DRAFT_FACTOR times `needed`."""
    ratio = min(width // needed[0], height // needed[1])
    return next((f for f in DRAFT_FACTORS if ratio >= f), 1)


def _to_resamplable(image: Image.Image) -> Image.Image:
    if image.mode in _RESAMPLABLE_MODES:
        return image
    if image.mode.startswith("I"):
        # 16/32-bit grey (some PNGs): keep the top 8 bits of the 16-bit range.
        array = np.asarray(image, dtype=np.int64)
        shift = 8 if array.max(initial=0) > np.iinfo(np.uint8).max else 0
        return Image.fromarray((array >> shift).clip(0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def _simplejpeg_decode(data: bytes, width: int, height: int, factor: int) -> np.ndarray | None:
    """RGB uint8 [ceil(height / factor), ceil(width / factor), 3], or None if simplejpeg
    rejects the file. strict=True makes libjpeg's warnings (truncated data, stray bytes)
    errors, so such files take PIL's path and get PIL's verdict, exactly as before."""
    try:
        if factor == 1:
            return simplejpeg.decode_jpeg(data, "RGB")
        # The smallest libjpeg-turbo scale (n/8) that keeps this size is exactly 1/factor.
        return simplejpeg.decode_jpeg(
            data, "RGB", min_height=-(-height // factor), min_width=-(-width // factor)
        )
    except ValueError:
        return None


def _decode_for_scale(data: bytes, scale: int) -> tuple[Image.Image, int, tuple[int, int]]:
    """Decodes an image for a (virtual) rescale to shortest side `scale`.

    Returns:
      (image in mode RGB or L, decoded at 1/factor of its size; factor; the full
      (width, height)). A JPEG at least MIN_DRAFT_FACTOR times the rescaled size is
      decoded at reduced scale (factor 2, 4 or 8), anything else at full size (factor 1).
    """
    size = _jpeg_header(data)
    if size is not None:
        factor = decode_factor(*size, rescaled_size(*size, scale))
        array = _simplejpeg_decode(data, *size, factor)
        if array is not None:
            return Image.fromarray(array), factor, size
    image = open_image(data)
    size = image.size
    factor = _maybe_draft(image, rescaled_size(*size, scale))
    return _to_resamplable(image), factor, size


def _decode_array_for_scale(data: bytes, scale: int) -> tuple[np.ndarray, int, tuple[int, int]]:
    """As `_decode_for_scale`, but the pixels as a uint8 array ([h, w, 3] RGB, or [h, w]
    grey from PIL's path), without copying simplejpeg's output into a PIL image."""
    size = _jpeg_header(data)
    if size is not None:
        factor = decode_factor(*size, rescaled_size(*size, scale))
        array = _simplejpeg_decode(data, *size, factor)
        if array is not None:
            return array, factor, size
    image = open_image(data)
    size = image.size
    factor = _maybe_draft(image, rescaled_size(*size, scale))
    return np.asarray(_to_resamplable(image), dtype=np.uint8), factor, size


def decode_image(data: bytes) -> np.ndarray:
    """Decodes an encoded image (JPEG of any colour space, PNG, ...) to RGB uint8 [H, W, 3].

    Grayscale and CMYK become RGB; the file type is read from the content, not the name.
    """
    size = _jpeg_header(data)
    if size is not None:
        array = _simplejpeg_decode(data, *size, 1)
        if array is not None:
            return array
    image = open_image(data)
    image.load()
    return _to_rgb_array(_to_resamplable(image))


def _maybe_draft(image: Image.Image, needed: tuple[int, int]) -> int:
    """PIL's reduced-scale decoding: decodes a JPEG at 1/decode_factor(...) scale (lazily,
    at load) and returns that factor; 1 (no-op) for other formats or small JPEGs."""
    factor = decode_factor(*image.size, needed)
    # draft() picks the same factor, and is a no-op returning None for non-JPEG files.
    if factor > 1 and image.draft("RGB", needed) is not None:
        return factor
    return 1


def decode_rescaled(data: bytes, scale: int) -> np.ndarray:
    """Decodes an image rescaled isotropically to shortest side `scale`, RGB uint8 [H, W, 3].

    Same result as `rescale_shorter_side(decode_image(data), scale)`, but a large JPEG is
    decoded at reduced scale first (dense evaluation, mean-RGB statistics).
    """
    image, _, size = _decode_for_scale(data, scale)
    size = rescaled_size(*size, scale)
    if image.size != size:
        image = image.resize(size, RESAMPLE)
    return _to_rgb_array(image)


def resample_crop(
    data: bytes, scale: int, left: int, top: int, crop_size: int, flip: bool = False
) -> np.ndarray:
    """Crop (left, top, crop_size) of an image rescaled to shortest side `scale`, fast path.

    Decodes at reduced scale when the JPEG is at least MIN_DRAFT_FACTOR times the needed
    size, then resamples only the crop window; the rescaled image is never built.

    Args:
      data: the encoded image.
      scale: the shortest side after the virtual rescale (S or Q).
      left, top: the crop corner in rescaled pixels.
      crop_size: the crop side.
      flip: mirror the crop horizontally.

    Returns:
      RGB uint8 [crop_size, crop_size, 3].
    """
    array, factor, (width, height) = _decode_array_for_scale(data, scale)
    box = [v / factor for v in source_box(width, height, scale, left, top, crop_size)]
    # Clamp against float rounding after a reduced-scale decode (its size is rounded up).
    rows, cols = array.shape[:2]
    x0, y0 = max(0.0, box[0]), max(0.0, box[1])
    x1, y1 = min(float(cols), box[2]), min(float(rows), box[3])
    sx, sy = (x1 - x0) / crop_size, (y1 - y0) / crop_size
    if max(sx, sy) >= MIN_DRAFT_FACTOR:
        # Shrinking by 2x or more (beyond the 1/8 decode, or a large PNG): plain bilinear
        # would skip source pixels, so take PIL's antialiased filter.
        image = Image.fromarray(array)
        crop = np.asarray(image.resize((crop_size, crop_size), RESAMPLE, box=(x0, y0, x1, y1)))
        return _flip_to_rgb(crop, flip)
    # Output pixel centre (x + 0.5) sits at source position x0 + (x + 0.5) * sx, i.e. pixel
    # index x0 + (x + 0.5) * sx - 0.5: the sampling points of a full resize then crop.
    matrix = np.array(
        [[sx, 0.0, x0 + 0.5 * sx - 0.5], [0.0, sy, y0 + 0.5 * sy - 0.5]], np.float64
    )
    # Bilinear without antialiasing: after the reduced-scale decode the window is less than
    # MIN_DRAFT_FACTOR times the crop, so the 2x2 taps still cover the source densely
    # (mean difference to PIL's antialiased bilinear: tests/test_data_transforms.py).
    crop = cv2.warpAffine(
        array,
        matrix,
        (crop_size, crop_size),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
    return _flip_to_rgb(crop, flip)


def _flip_to_rgb(crop: np.ndarray, flip: bool) -> np.ndarray:
    if flip:
        crop = cv2.flip(crop, 1)
    if crop.ndim == 2:  # grey from PIL's path
        crop = cv2.cvtColor(crop, cv2.COLOR_GRAY2RGB)
    return crop


# --------------------------------------------------------------------------------------
# Training augmentation
# --------------------------------------------------------------------------------------


def sample_scale(rng: np.random.Generator, scale_min: int, scale_max: int) -> int:
    """Training scale S: fixed when scale_min == scale_max, else uniform integer in range."""
    if scale_min == scale_max:
        return int(scale_min)
    return int(rng.integers(scale_min, scale_max + 1))


def sample_crop_corner(
    rng: np.random.Generator, width: int, height: int, scale: int, crop_size: int
) -> tuple[int, int]:
    """A uniformly random crop corner (left, top) in the image rescaled to `scale`."""
    rw, rh = rescaled_size(width, height, scale)
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


def _failed(name: str, error: Exception, crop_size: int, label: int) -> dict[str, Any]:
    logger.warning(
        "Could not decode image %s (%s: %s); using a zero image with mask=False.",
        name,
        error.__class__.__name__,
        error,
    )
    return _example(np.zeros((crop_size, crop_size, 3), np.uint8), label, None, False)


def _example(
    image: np.ndarray, label: int, rgb_shift: np.ndarray | None, mask: bool
) -> dict[str, Any]:
    return {
        "image": image,
        "label": np.int32(label),
        "rgb_shift": np.zeros(3, np.float32) if rgb_shift is None else rgb_shift,
        "mask": np.bool_(mask),
    }


# Decoding errors of a broken or truncated file (PIL raises several types).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class TrainTransform(grain.transforms.RandomMap):
    """The paper's training augmentation (3.1) of one record, as a grain RandomMap.

    Output: {"image": uint8 [size, size, 3], "label": int32, "rgb_shift": float32 [3]
    (0-255 units, zeros when disabled), "mask": bool (False for an undecodable file,
    whose image is zeros)}.

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
        if not self.crop_size <= self.scale_min <= self.scale_max:
            raise ValueError(
                f"Need image_size <= train_scale_min <= train_scale_max, got "
                f"{self.crop_size}, {self.scale_min}, {self.scale_max}: fix config.data."
            )

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        # `rng` is this element's own generator (grain derives it from the seed and the
        # element's index), so the draws never depend on other images or on workers.
        scale = sample_scale(rng, self.scale_min, self.scale_max)
        # Drawn even when flipping is off, so that switching it changes nothing else.
        flip = bool(rng.integers(0, 2)) and self.random_flip
        rgb_shift = pca_colour_shift(
            rng, self.colour_shift_std, self.eigenvalues, self.eigenvectors
        )
        try:
            data = element["image"]
            left, top = sample_crop_corner(rng, *image_size(data), scale, self.crop_size)
            array = resample_crop(data, scale, left, top, self.crop_size, flip)
        except DECODE_ERRORS as e:
            return _failed(element["name"], e, self.crop_size, element["label"])
        return _example(array, element["label"], rgb_shift, True)


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
      One of DECODE_ERRORS for an undecodable image.
    """
    rw, rh = rescaled_size(*image_size(data), scale)
    left, top = (rw - crop_size) // 2, (rh - crop_size) // 2
    return resample_crop(data, scale, left, top, crop_size)


class EvalTransform(grain.transforms.Map):
    """Validation view of one record: rescale to shortest side Q, centre image_size crop.

    A record whose image is None (padding added by the eval pipeline) gives a zero image,
    label 0 and mask False, silently. Output keys as `TrainTransform`, with rgb_shift zeros.

    Args:
      crop_size: config.data.image_size.
      scale: the test scale Q.
    """

    def __init__(self, crop_size: int, scale: int):
        self.crop_size = int(crop_size)
        self.scale = int(scale)
        if self.scale < self.crop_size:
            raise ValueError(
                f"Test scale Q={self.scale} is smaller than the crop image_size="
                f"{self.crop_size}; use Q >= image_size."
            )

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        if element["image"] is None:  # Padding that evens out the processes' shares.
            return _example(np.zeros((self.crop_size, self.crop_size, 3), np.uint8), 0, None, False)
        try:
            array = centre_view(element["image"], self.scale, self.crop_size)
        except DECODE_ERRORS as e:
            return _failed(element["name"], e, self.crop_size, element["label"])
        return _example(array, element["label"], None, True)


# --------------------------------------------------------------------------------------
# Evaluation views on decoded images (numpy in, numpy out)
# --------------------------------------------------------------------------------------


def rescale_shorter_side(image: np.ndarray, q: int) -> np.ndarray:
    """Isotropically rescales an image so that its shortest side is q (dense evaluation).

    Args:
      image: uint8 [H, W, 3].
      q: the test scale Q.

    Returns:
      uint8 [H', W', 3] with min(H', W') == q.
    """
    height, width = image.shape[:2]
    size = rescaled_size(width, height, q)
    if size == (width, height):
        return np.asarray(image, np.uint8)
    return np.asarray(Image.fromarray(np.asarray(image, np.uint8)).resize(size, RESAMPLE))


def centre_crop(image: np.ndarray, crop_size: int) -> np.ndarray:
    """The central crop_size x crop_size window of an [H, W, C] image (H, W >= crop_size)."""
    height, width = image.shape[:2]
    top, left = (height - crop_size) // 2, (width - crop_size) // 2
    return image[top : top + crop_size, left : left + crop_size]


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


def multi_crop_views(image: np.ndarray, q: int, crop_size: int, grid: int) -> np.ndarray:
    """`grid_crops` of an image rescaled to shortest side q: the 2 * grid^2 views at scale Q."""
    return grid_crops(rescale_shorter_side(image, q), crop_size, grid)


def subtract_mean(
    image: np.ndarray, mean_rgb: Sequence[float], rgb_shift: np.ndarray
) -> np.ndarray:
    """Host-side reference of the train step's input normalisation (done there on device).

    Args:
      image: uint8 [..., H, W, 3].
      mean_rgb: config.data.mean_rgb (0-255).
      rgb_shift: float32 [..., 3] from the pipeline.

    Returns:
      float32 image - mean_rgb + rgb_shift, broadcast per image over its pixels.
    """
    shift = np.asarray(rgb_shift, np.float32)[..., None, None, :]
    return image.astype(np.float32) - np.asarray(mean_rgb, np.float32) + shift
