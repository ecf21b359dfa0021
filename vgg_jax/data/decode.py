"""Decoding and resampling of encoded images: the pixels under the per-image transforms.

What it holds: reading an image's size from its header (`image_size`; JPEG headers through
simplejpeg, everything else through PIL's `open_image`), the JPEG decoders (libjpeg-turbo
through simplejpeg, PIL for the rest), the reduced-scale rule `decode_factor`, the
crop-window resample `resample_crop` and its geometry (`rescaled_size`, `source_box`),
`decode_rescaled` (the whole image at a test scale), `decode_image` (full size, the
reference that tests compare the fast paths against), the filter `RESAMPLE` and the
exceptions of a broken file, `DECODE_ERRORS`. The paper's augmentations and views
(vgg_jax.data.transforms) are built on these and import this module, never the other way
round.

Why a fast path: decoding and resizing dominate the input pipeline's CPU time, so the
image is decoded at reduced DCT scale where the JPEG allows it and only the needed window
is resampled. The fast path never builds the rescaled image: the crop window is mapped
back to source pixels and only that window is resampled (OpenCV's bilinear `cv2.remap`
with fixed-point maps, sub-pixel placement, faster than PIL's `Image.resize(...,
box=...)`; not antialiased, which the reduced-scale decode below makes unnecessary: the
window is then less than twice the crop, and PIL takes over when it is not). JPEGs are
decoded by libjpeg-turbo through simplejpeg (same pixels as PIL's decoder, faster),
at 1/2, 1/4 or 1/8 scale when the JPEG is at least twice the needed size; CMYK JPEGs,
PNGs and anything simplejpeg rejects go through PIL (`Image.draft` for the reduced
scale). The result matches PIL's rescale-then-crop to within resampling differences
(below 1 grey level mean on smooth images; tests/test_data_transforms.py). The measured
speed figures (against PIL references, per piece and end to end) are in
docs/input_pipeline.md, "Throughput".
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

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
# OpenCV's fixed-point remap: source positions in 1/32 pixel (cv2's INTER_BITS = 5).
REMAP_FRACTION_BITS = 5
REMAP_SUBPIXELS = 1 << REMAP_FRACTION_BITS


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


# Leading bytes of an unreadable file quoted in its error, so a person can tell what it is.
_QUOTED_BYTES = 16


def open_image(data: bytes) -> Image.Image:
    """Opens encoded image bytes lazily (header only); the format comes from the content.

    Raises:
      PIL.UnidentifiedImageError: not an image format PIL reads; the message describes the
        bytes (PIL's own names an in-memory buffer's address, which says nothing).
    """
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UnidentifiedImageError(
            f"not an image format PIL reads ({len(data)} bytes, starting "
            f"{data[:_QUOTED_BYTES]!r})") from None


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


def _decode_array_for_scale(data: bytes, scale: int) -> tuple[np.ndarray, int, tuple[int, int]]:
    """Decodes an image for a (virtual) rescale to shortest side `scale`.

    Returns:
      (uint8 pixels, [h, w, 3] RGB or [h, w] grey (PIL's path only), decoded at 1/factor
      of the image's size; factor; the full (width, height)). A JPEG at least
      MIN_DRAFT_FACTOR times the rescaled size is decoded at reduced scale (factor 2, 4 or
      8), anything else at full size (factor 1). simplejpeg's output is returned as it is,
      never copied into a PIL image.
    """
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

    The pipeline itself never decodes at full size (it uses `resample_crop` and
    `decode_rescaled`); this is the full-resolution reference that the tests compare the
    simplejpeg and PIL paths and the reduced-scale decode against.
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

    Same result as `testing.rescale_shorter_side(decode_image(data), scale)`, but a large JPEG is
    decoded at reduced scale first (dense evaluation, mean-RGB statistics).
    """
    array, _, size = _decode_array_for_scale(data, scale)
    size = rescaled_size(*size, scale)
    if array.shape[1::-1] != size:
        array = np.asarray(Image.fromarray(array).resize(size, RESAMPLE))
    return _flip_to_rgb(array, False)


def resample_crop(
    data: bytes,
    scale: int,
    left: int,
    top: int,
    crop_size: int,
    flip: bool = False,
    out: np.ndarray | None = None,
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
      out: where to write the crop (a uint8 [crop_size, crop_size, 3] array, e.g. a slot
        of a batch in shared memory); None allocates one.

    Returns:
      RGB uint8 [crop_size, crop_size, 3]: `out` when given.
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
        return _into(_flip_to_rgb(crop, flip), out)
    # Bilinear without antialiasing: after the reduced-scale decode the window is less than
    # MIN_DRAFT_FACTOR times the crop, so the 2x2 taps still cover the source densely
    # (mean difference to PIL's antialiased bilinear: tests/test_data_transforms.py).
    # The flip is in the maps (each output pixel is interpolated on its own, so mirrored
    # maps give the mirrored crop exactly), and the crop is written where it is wanted:
    # no second pass, no copy.
    maps = _window_maps(x0, y0, sx, sy, crop_size, flip)
    if array.ndim == 2:  # grey from PIL's path: resample one channel, then widen the crop
        grey = cv2.remap(array, *maps, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        return _into(cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB, dst=out), out)
    crop = cv2.remap(array, *maps, cv2.INTER_LINEAR, dst=out, borderMode=cv2.BORDER_REPLICATE)
    return _into(crop, out)


def _axis_taps(start: float, step: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer source index and 1/REMAP_SUBPIXELS fraction of each output pixel on one axis.

    Output pixel centre (i + 0.5) sits at source position start + (i + 0.5) * step, i.e. at
    pixel index start + (i + 0.5) * step - 0.5: the sampling points of a full resize then
    crop.
    """
    position = start + (np.arange(size) + 0.5) * step - 0.5
    fixed = np.rint(position * REMAP_SUBPIXELS).astype(np.int64)
    # Arithmetic shift: floor, also for the -0.5 pixel positions at the left/top border.
    return fixed >> REMAP_FRACTION_BITS, fixed & (REMAP_SUBPIXELS - 1)


def _window_maps(
    x0: float, y0: float, sx: float, sy: float, crop_size: int, flip: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """cv2.remap's fixed-point maps (CV_16SC2 indices, CV_16UC1 fractions) of the window.

    The map is separable (x depends on the column only, y on the row only), so it is built
    from two 1-D axes; remap with fixed-point maps skips the per-pixel coordinate
    arithmetic of warpAffine (timings: docs/input_pipeline.md, "Training transform").
    `flip` reverses the columns' taps: the maps of the mirrored crop.
    """
    ix, fx = _axis_taps(x0, sx, crop_size)
    if flip:
        ix, fx = ix[::-1], fx[::-1]
    iy, fy = _axis_taps(y0, sy, crop_size)
    indices = np.empty((crop_size, crop_size, 2), np.int16)
    indices[..., 0] = ix.astype(np.int16)
    indices[..., 1] = iy.astype(np.int16)[:, None]
    # Built from 16-bit axes: a full-size int64 intermediate costs more than the remap.
    fractions = np.add.outer((fy * REMAP_SUBPIXELS).astype(np.uint16), fx.astype(np.uint16))
    return indices, fractions


def _into(crop: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """`crop` in `out` (OpenCV writes into a suitable `dst` itself; otherwise copy)."""
    if out is None:
        return crop
    if not np.may_share_memory(crop, out):
        out[...] = crop
    return out


def _flip_to_rgb(crop: np.ndarray, flip: bool) -> np.ndarray:
    if flip:
        crop = cv2.flip(crop, 1)
    if crop.ndim == 2:  # grey from PIL's path
        crop = cv2.cvtColor(crop, cv2.COLOR_GRAY2RGB)
    return crop


# Decoding errors of a broken or truncated file (PIL raises several types).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
