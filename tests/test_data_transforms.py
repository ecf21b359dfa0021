"""Each training and evaluation transform on its own (vgg_jax/data/transforms.py), and the
decoding and resampling under them (vgg_jax/data/decode.py)."""

import logging

import jax.numpy as jnp
import numpy as np
import pytest
import small_data
from PIL import Image

from vgg_jax import preprocess
from vgg_jax.data import decode, testing, transforms


def _record(data, label=3, name="img.jpg"):
    return {"image": data, "label": label, "name": name}


def _jpeg(rng, height=48, width=64, **kwargs):
    # Large images get proportionally larger detail, like photos (a fixed 8-pixel detail
    # would sit at the Nyquist limit once shrunk 4x, where any two filters disagree).
    cell = max(8, min(height, width) // 12)
    pixels = testing.smooth_image(rng, height, width, cell)
    return testing.encode(pixels, "JPEG", quality=95, **kwargs)


def _reference_crop(data, scale, left, top, crop):
    """Plain rescale-then-crop, the definition the fast path must match."""
    image = Image.open(__import__("io").BytesIO(data)).convert("RGB")
    size = decode.rescaled_size(*image.size, scale)
    full = np.asarray(image.resize(size, decode.RESAMPLE))
    return full[top : top + crop, left : left + crop]


def test_rescaled_size_keeps_aspect_and_shortest_side():
    assert decode.rescaled_size(64, 48, 40) == (53, 40)
    assert decode.rescaled_size(48, 64, 40) == (40, 53)
    assert decode.rescaled_size(500, 375, 256) == (341, 256)


def test_sample_scale_fixed_and_uniform_over_the_whole_range():
    rng = np.random.default_rng(0)
    assert {transforms.sample_scale(rng, 256, 256) for _ in range(10)} == {256}
    draws = np.array([transforms.sample_scale(rng, 256, 512) for _ in range(4000)])
    assert draws.min() == 256 and draws.max() == 512
    assert abs(draws.mean() - 384) < 4


def test_train_transform_shapes_dtypes_and_scale_range():
    rng = np.random.default_rng(0)
    config = small_data.data_config(train_scale_min=32, train_scale_max=48)
    out = transforms.TrainAugmentation(config).augment(_record(_jpeg(rng)), np.random.default_rng(1))
    assert out["image"].shape == (32, 32, 3) and out["image"].dtype == np.uint8
    assert out["label"].dtype == np.int32 and out["label"] == 3
    assert out["rgb_shift"].shape == (3,) and out["rgb_shift"].dtype == np.float32
    assert out["mask"].dtype == np.bool_ and bool(out["mask"])


@pytest.mark.parametrize("width,height,scale", [(64, 48, 32), (48, 64, 48), (500, 375, 256)])
def test_crop_corners_stay_inside_the_rescaled_image(width, height, scale):
    rng = np.random.default_rng(0)
    crop = 32 if scale < 256 else 224
    rw, rh = decode.rescaled_size(width, height, scale)
    corners = np.array(
        [transforms.sample_crop_corner(rng, width, height, scale, crop) for _ in range(2000)]
    )
    assert corners.min() == 0
    assert corners[:, 0].max() == rw - crop and corners[:, 1].max() == rh - crop
    for left, top in corners[:50]:
        box = decode.source_box(width, height, scale, left, top, crop)
        assert 0 <= box[0] < box[2] <= width + 1e-9 and 0 <= box[1] < box[3] <= height + 1e-9


def test_random_flip_mirrors_about_half_of_the_images():
    data = _jpeg(np.random.default_rng(0))
    flip_on = transforms.TrainAugmentation(small_data.data_config(random_flip=True))
    flip_off = transforms.TrainAugmentation(small_data.data_config(random_flip=False))
    flipped = 0
    for seed in range(100):
        a = flip_on.augment(_record(data), np.random.default_rng(seed))["image"]
        b = flip_off.augment(_record(data), np.random.default_rng(seed))["image"]
        if np.array_equal(a, b):
            continue
        np.testing.assert_array_equal(a, b[:, ::-1])
        flipped += 1
    assert 30 <= flipped <= 70


def test_pca_colour_shift_statistics():
    config = small_data.data_config()
    rng = np.random.default_rng(0)
    shifts = np.stack(
        [
            transforms.pca_colour_shift(
                rng, 0.1, config.pca_eigenvalues, config.pca_eigenvectors
            )
            for _ in range(20000)
        ]
    )
    assert shifts.dtype == np.float32
    np.testing.assert_allclose(shifts.mean(0), 0, atol=0.3)
    # Projected on the eigenvectors, the shift is alpha * lambda * 255, alpha ~ N(0, 0.1).
    vectors = np.asarray(config.pca_eigenvectors)
    alpha = (np.linalg.solve(vectors, shifts.T.astype(np.float64)).T / 255) / np.asarray(
        config.pca_eigenvalues
    )
    np.testing.assert_allclose(alpha.std(0), 0.1, rtol=0.05)
    off = transforms.pca_colour_shift(rng, 0.0, config.pca_eigenvalues, config.pca_eigenvectors)
    np.testing.assert_array_equal(off, np.zeros(3, np.float32))
    out = transforms.TrainAugmentation(small_data.data_config(colour_shift_std=0.0)).augment(
        _record(_jpeg(rng)), rng
    )
    np.testing.assert_array_equal(out["rgb_shift"], np.zeros(3))


def test_mean_subtraction_semantics_of_the_train_step():
    images = np.full((2, 4, 4, 3), 200, np.uint8)
    shift = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], np.float32)
    # The normalisation that the train step runs on the device (std 1: the paper's recipe).
    out = preprocess.normalize_images(
        jnp.asarray(images), (100.0, 50.0, 0.0), (1.0, 1.0, 1.0), jnp.asarray(shift))
    assert out.dtype == jnp.float32
    out = np.asarray(out)
    np.testing.assert_allclose(out[0, 1, 2], [101.0, 152.0, 203.0])
    np.testing.assert_allclose(out[1, 3, 3], [100.0, 150.0, 200.0])


@pytest.mark.parametrize(
    "height,width,scale,crop,max_diff",
    [
        # OpenCV's bilinear (not antialiased, 1/32-pixel fixed-point taps) against PIL's
        # antialiased bilinear; measured worst mean of 5 crops: 0.72, 0.65, 0.46 (max 4, 5, 3).
        (48, 64, 40, 32, 1.0),  # upscaling, no draft
        (48, 64, 32, 32, 1.0),  # crop spans the whole short side
        (375, 500, 80, 64, 3.0),  # 4x bigger than needed: decoded by draft at 1/4 scale
        (375, 500, 256, 224, 0.5),  # the ImageNet case: 1.46x shrink, no draft (0.22)
    ],
)
def test_fast_path_matches_rescale_then_crop(height, width, scale, crop, max_diff):
    rng = np.random.default_rng(0)
    data = _jpeg(rng, height, width)
    diffs = []
    for _ in range(5):
        left, top = transforms.sample_crop_corner(rng, width, height, scale, crop)
        fast = decode.resample_crop(data, scale, left, top, crop)
        reference = _reference_crop(data, scale, left, top, crop)
        assert fast.shape == reference.shape == (crop, crop, 3)
        diffs.append(np.abs(fast.astype(float) - reference).mean())
    assert max(diffs) < max_diff, diffs


def test_reduced_scale_decoding_only_when_the_jpeg_is_twice_the_needed_size():
    assert decode.decode_factor(500, 375, decode.rescaled_size(500, 375, 80)) == 4
    assert decode.decode_factor(500, 375, decode.rescaled_size(500, 375, 256)) == 1
    assert decode.decode_factor(500, 375, (250, 187)) == 2
    assert decode.decode_factor(4000, 3000, (341, 256)) == 8  # never beyond 1/8
    data = _jpeg(np.random.default_rng(0), 375, 500)
    array, factor, size = decode._decode_array_for_scale(data, 80)
    assert (array.shape, factor, size) == ((94, 125, 3), 4, (500, 375))  # decoded at 1/4 scale
    array, factor, _ = decode._decode_array_for_scale(data, 256)
    assert (array.shape, factor) == ((375, 500, 3), 1)


def _pil_only(monkeypatch):
    """Sends every file through PIL's decoder, as if simplejpeg had rejected it."""
    monkeypatch.setattr(decode, "_jpeg_header", lambda data: None)


@pytest.mark.parametrize("scale,crop", [(256, 224), (80, 64), (40, 32)])
def test_simplejpeg_path_gives_the_pixels_of_the_pil_path(monkeypatch, scale, crop):
    # Same libjpeg-turbo decode (accurate DCT, fancy upsampling), same reduced-scale rule:
    # the fast decoder must not change a single pixel.
    rng = np.random.default_rng(0)
    images = [_jpeg(rng, 375, 500), _jpeg(rng, 300, 200)]
    grey = testing.encode(testing.smooth_image(rng, 300, 200)[..., 0], "JPEG", quality=90)
    rgb = testing.encode(testing.smooth_image(rng, 300, 200), "JPEG", quality=90, keep_rgb=True)
    cases = []
    for data in (*images, grey, rgb):
        width, height = decode.image_size(data)
        left, top = transforms.sample_crop_corner(rng, width, height, scale, crop)
        cases.append((data, left, top))
    fast = [decode.resample_crop(d, scale, x, y, crop, flip=True) for d, x, y in cases]
    full = [decode.decode_image(d) for d, _, _ in cases]
    rescaled = [decode.decode_rescaled(d, scale) for d, _, _ in cases]
    _pil_only(monkeypatch)
    for (data, left, top), a, b, c in zip(cases, fast, full, rescaled):
        np.testing.assert_array_equal(a, decode.resample_crop(data, scale, left, top, crop, flip=True))
        np.testing.assert_array_equal(b, decode.decode_image(data))
        np.testing.assert_array_equal(c, decode.decode_rescaled(data, scale))


def test_baseline_jpegs_skip_pil_and_others_use_it(monkeypatch):
    rng = np.random.default_rng(0)
    jpeg = _jpeg(rng)
    png = testing.encode(testing.smooth_image(rng, 48, 64), "PNG")
    cmyk = testing.encode(
        np.asarray(Image.fromarray(testing.smooth_image(rng, 48, 64)).convert("CMYK")),
        "JPEG", mode="CMYK", quality=95,
    )
    assert decode._jpeg_header(jpeg) == (64, 48)
    assert decode._jpeg_header(png) is None and decode._jpeg_header(cmyk) is None
    assert decode.image_size(png) == decode.image_size(cmyk) == (64, 48)
    opened = []
    real_open = decode.open_image
    monkeypatch.setattr(decode, "open_image", lambda data: opened.append(1) or real_open(data))
    transforms.TrainAugmentation(small_data.data_config()).augment(_record(jpeg), np.random.default_rng(0))
    assert not opened
    transforms.TrainAugmentation(small_data.data_config()).augment(_record(png), np.random.default_rng(0))
    assert opened


def test_jpeg_with_stray_bytes_still_decodes():
    # libjpeg warns "Corrupt JPEG data: 16 extraneous bytes before marker 0xd9"; simplejpeg
    # (strict) rejects it, and PIL decodes it as it always did.
    data = _jpeg(np.random.default_rng(0))
    stray = data[:-2] + bytes(16) + data[-2:]
    out = transforms.TrainAugmentation(small_data.data_config()).augment(
        _record(stray), np.random.default_rng(0)
    )
    assert out["mask"] and out["image"].any()
    np.testing.assert_array_equal(decode.decode_image(stray), decode.decode_image(data))


def test_quirky_files_decode_to_rgb(tmp_path):
    rng = np.random.default_rng(0)
    pixels = testing.smooth_image(rng, 48, 64)
    cmyk = testing.encode(
        np.asarray(Image.fromarray(pixels).convert("CMYK")), "JPEG", mode="CMYK", quality=95
    )
    grey = testing.encode(pixels[..., 0], "JPEG", quality=95)
    png = testing.encode(pixels, "PNG")
    palette = testing.encode(
        np.asarray(Image.fromarray(pixels).convert("P")), "PNG", mode="P"
    )
    transform = transforms.TrainAugmentation(small_data.data_config())

    def evaluate(data):  # the validation view
        return transforms.image_views(data, transforms.SINGLE_CROP, 40, 32)[0]

    for data, name in ((cmyk, "cmyk.JPEG"), (grey, "grey.JPEG"), (png, "png.JPEG"), (palette, "p.JPEG")):
        assert decode.decode_image(data).shape == (48, 64, 3)
        out = transform.augment(_record(data, name=name), np.random.default_rng(0))
        assert out["image"].shape == (32, 32, 3) and bool(out["mask"]), name
        assert evaluate(data).shape == (32, 32, 3), name
    # The grey JPEG becomes three equal channels; the CMYK one keeps its colours.
    grey_out = evaluate(grey).astype(int)
    np.testing.assert_array_equal(grey_out[..., 0], grey_out[..., 2])
    cmyk_crop = evaluate(cmyk).astype(float)
    rgb_crop = evaluate(png).astype(float)
    assert np.abs(cmyk_crop - rgb_crop).mean() < 8


def test_truncated_file_gives_masked_zero_image_and_a_note_or_warning(caplog):
    data = _jpeg(np.random.default_rng(0), 375, 500)
    truncated = data[: len(data) // 3]
    transform = transforms.TrainAugmentation(small_data.data_config())
    with caplog.at_level(logging.WARNING):
        out = transform.augment(_record(truncated, name="/x/broken.JPEG"), np.random.default_rng(0))
    assert not out["mask"] and out["image"].shape == (32, 32, 3) and not out["image"].any()
    np.testing.assert_array_equal(out["rgb_shift"], np.zeros(3))
    assert out["label"] == 3
    # Training names the file in the example (the pipeline warns once per file where
    # batches are consumed: tests/test_data_pipeline.py); evaluation's views raise, and the
    # evaluation plan masks and warns (tests/test_evaluate.py).
    assert b"/x/broken.JPEG" in out[transforms.DECODE_ERROR_KEY]
    assert "broken.JPEG" not in caplog.text
    with pytest.raises(decode.DECODE_ERRORS, match=r"not an image format PIL reads \(12 bytes, "
                                                   r"starting b'not an image'\)"):
        transforms.image_views(b"not an image", transforms.SINGLE_CROP, 40, 32)
    text = transform.augment(_record(b"hello", name="/x/notes.jpg"), np.random.default_rng(0))
    assert text[transforms.DECODE_ERROR_KEY] == (
        b"/x/notes.jpg (UnidentifiedImageError: not an image format PIL reads (5 bytes, "
        b"starting b'hello'))")  # stable, so the pipeline warns once per file
    good = transform.augment(_record(data), np.random.default_rng(0))
    assert good["mask"] and good[transforms.DECODE_ERROR_KEY] == b""


def test_single_crop_view_is_the_centre_crop_of_the_rescaled_image():
    data = _jpeg(np.random.default_rng(0))
    out = transforms.image_views(data, transforms.SINGLE_CROP, 40, 32)
    assert out.shape == (1, 32, 32, 3)
    reference = testing.centre_crop(testing.rescale_shorter_side(decode.decode_image(data), 40), 32)
    assert np.abs(out[0].astype(float) - reference).mean() < 1


def test_rescale_shorter_side_and_multi_crop_grid():
    image = testing.smooth_image(np.random.default_rng(0), 48, 64)
    rescaled = testing.rescale_shorter_side(image, 40)
    assert rescaled.shape == (40, 53, 3) and rescaled.dtype == np.uint8
    assert testing.rescale_shorter_side(image, 48) is not None
    views = transforms.grid_crops(rescaled, 32, 5)
    assert views.shape == (50, 32, 32, 3) and views.dtype == np.uint8
    np.testing.assert_array_equal(views[0], rescaled[:32, :32])  # top-left
    np.testing.assert_array_equal(views[24], rescaled[-32:, -32:])  # bottom-right
    np.testing.assert_array_equal(views[25:], views[:25, :, ::-1])  # flips follow
    np.testing.assert_array_equal(transforms.grid_offsets(53, 32, 5), [0, 5, 10, 16, 21])


def test_decode_rescaled_matches_decode_then_rescale():
    data = _jpeg(np.random.default_rng(0), 375, 500)
    fast = decode.decode_rescaled(data, 80)
    reference = testing.rescale_shorter_side(decode.decode_image(data), 80)
    assert fast.shape == reference.shape == (80, 107, 3)
    assert np.abs(fast.astype(float) - reference).mean() < 3


def test_a_crop_larger_than_s_is_rejected():
    with pytest.raises(ValueError, match="train_scale_min=40 is smaller than the crop"):
        transforms.check_config(small_data.data_config(image_size=48, train_scale_min=40))
