"""Localisation's geometry on hand-worked cases: boxes through rescale, crop and flip (and
the real decode path), ILSVRC's IoU and 5-guess rule, greedy merging, and dense outputs
mapped back to the image."""

import io

import ml_collections
import numpy as np
import pytest
import small_data
from PIL import Image

from vgg_jax.data.transforms import CropPlacement
from vgg_jax.localisation import boxes, dense, merging, metric, regression
from vgg_jax.localisation.training import BOX_KEY, BOX_WEIGHT_KEY, BoxTrainAugmentation


def test_pixel_and_edge_boxes_differ_by_the_last_pixel():
    pixels = np.array([[2, 3, 2, 7]])  # one column wide, five rows high
    edges = boxes.pixels_to_edges(pixels)
    np.testing.assert_array_equal(edges, [[2, 3, 3, 8]])
    np.testing.assert_array_equal(boxes.edges_to_pixels(edges), pixels)


def test_clipping_counts_boxes_outside_the_image_and_drops_those_wholly_outside():
    clipped, changed, kept = boxes.clip_pixel_boxes(
        np.array([[-5, 2, 20, 8], [3, 3, 5, 5], [40, 0, 50, 5]]), width=30, height=10)
    np.testing.assert_array_equal(clipped[0], [0, 2, 20, 8])
    assert changed.tolist() == [True, False, True]
    assert kept.tolist() == [True, True, False]


def _placement(flip):
    # A 200 x 100 image rescaled to S = 50 (100 x 50), crop of 32 at (40, 10).
    return CropPlacement(200, 100, 100, 50, 40, 10, 32, flip)


def test_a_box_follows_rescale_crop_and_flip():
    edges = np.array([100.0, 30.0, 140.0, 70.0])  # source pixels, factor 0.5 -> (50, 15, 70, 35)
    np.testing.assert_allclose(boxes.to_crop(edges, _placement(False)), [10, 5, 30, 25])
    # Mirrored about the crop's centre line: x -> 32 - x, the edges swap.
    np.testing.assert_allclose(boxes.to_crop(edges, _placement(True)), [2, 5, 22, 25])


def test_window_to_image_undoes_the_crop():
    edges = np.array([[100.0, 30.0, 140.0, 70.0]])
    crop = boxes.to_crop(edges, _placement(False))
    centres = boxes.edges_to_centres(crop, 32)
    back = boxes.window_to_image(centres, np.array([40]), np.array([10]), 32, (0.5, 0.5))
    np.testing.assert_allclose(back, edges)


def test_visible_fraction():
    fractions = boxes.visible_fraction(np.array([[-10, 0, 10, 10], [0, 0, 8, 8],
                                                 [40, 0, 50, 4]]), size=32)
    np.testing.assert_allclose(fractions, [0.5, 1.0, 0.0])


def test_crop_target_takes_the_box_most_inside_and_drops_a_lost_object():
    placement = CropPlacement(64, 64, 64, 64, 16, 16, 32, False)
    # The first box is mostly outside the crop; the second is inside it.
    target, weight = regression.crop_target(np.array([[0, 0, 19, 19], [30, 30, 39, 39]]),
                                            placement, min_visible=0.5)
    np.testing.assert_allclose(target, [19 / 32, 19 / 32, 10 / 32, 10 / 32])
    assert weight == 1.0
    _, weight = regression.crop_target(np.array([[0, 0, 19, 19]]), placement, min_visible=0.5)
    assert weight == 0.0  # 16 of its 400 pixels are inside


def _jpeg_with_rectangle(box, size=(90, 60)):
    image = np.full((size[1], size[0], 3), 20, np.uint8)
    xmin, ymin, xmax, ymax = box
    image[ymin : ymax + 1, xmin : xmax + 1] = 235
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")  # lossless: the rectangle's edges stay sharp
    return buffer.getvalue()


@pytest.mark.parametrize("seed", range(6))
def test_the_training_target_matches_the_pixels_of_the_crop(seed):
    """Through the real decode and resample path, with flips: the bright rectangle of the
    crop is where the target says (to within the resampling's blur of a pixel)."""
    config = small_data.data_config(train_scale_min=40, train_scale_max=48, random_flip=True,
                                    colour_shift_std=0.0)
    transform = BoxTrainAugmentation(ml_collections.ConfigDict(
        {"data": config, "localisation": {"min_visible": 0.5}}))
    box = (30, 12, 61, 40)
    record = {"image": _jpeg_with_rectangle(box), "name": "rect.png", "label": 0,
              "boxes": np.array([box], np.float32)}
    out = np.zeros((32, 32, 3), np.uint8)
    example = transform.augment_example(record, np.random.default_rng(seed), out)
    edges = boxes.centres_to_edges(example[BOX_KEY], 32)
    if example[BOX_WEIGHT_KEY] == 0:  # dropped: the crop holds less than half the box
        assert boxes.visible_fraction(edges, 32) < 0.5
        return
    bright = out[..., 0] > 127
    rows, cols = np.flatnonzero(bright.any(axis=1)), np.flatnonzero(bright.any(axis=0))
    seen = np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], float)
    inside = np.clip(edges, 0, 32)
    np.testing.assert_allclose(seen, inside, atol=1.01)


def test_iou_counts_pixels_inclusively():
    # 10 x 10 boxes overlapping in 5 x 5 pixels: 25 / (100 + 100 - 25).
    assert metric.iou(np.array([0, 0, 9, 9]), np.array([5, 5, 14, 14])) == pytest.approx(1 / 7)
    # A one-pixel box has area 1, not 0.
    assert metric.iou(np.array([3, 3, 3, 3]), np.array([3, 3, 3, 3])) == 1.0
    # Boxes sharing one column overlap by 5 pixels of 45 (continuous areas would say 0).
    assert metric.iou(np.array([0, 0, 4, 4]), np.array([4, 0, 8, 4])) == pytest.approx(1 / 9)
    assert metric.iou(np.array([0, 0, 4, 4]), np.array([6, 0, 8, 4])) == 0.0


def test_a_guess_counts_with_the_right_class_and_half_overlap_within_five():
    truth = np.array([[0, 0, 9, 9], [50, 50, 59, 59]])
    near = [52, 50, 61, 59]  # IoU 80 / 120 with the second box
    assert metric.is_correct([3], [near], 3, truth)
    assert not metric.is_correct([4], [near], 3, truth)  # the wrong class
    # IoU exactly 0.5 counts (the devkit's >=): 50 / 100.
    half = metric.iou(np.array([0, 0, 9, 4]), np.array([0, 0, 9, 9]))
    assert half == 0.5 and metric.is_correct([3], [[0, 0, 9, 4]], 3, truth)
    # Only the first five guesses count.
    classes, guesses = [0, 1, 2, 4, 5, 3], [[100, 100, 101, 101]] * 5 + [near]
    assert not metric.is_correct(classes, guesses, 3, truth)
    assert metric.is_correct(classes[::-1], guesses[::-1], 3, truth)
    assert metric.localisation_error(3, 4) == 25.0


def test_greedy_merging_averages_by_score_and_stops_at_the_threshold():
    boxes_in = np.array([[0, 0, 9, 9], [1, 1, 10, 10], [50, 50, 59, 59]], float)
    scores = np.array([1.0, 3.0, 1.0])
    merged, merged_scores = merging.greedy_merge(boxes_in, scores, min_iou=0.5)  # IoU 81/119
    np.testing.assert_allclose(merged, [[0.75, 0.75, 9.75, 9.75], [50, 50, 59, 59]])
    np.testing.assert_allclose(merged_scores, [4.0, 1.0])
    unmerged, _ = merging.greedy_merge(boxes_in, scores, min_iou=0.7)
    np.testing.assert_allclose(unmerged, boxes_in[[1, 0, 2]])  # by score, ties in order
    # Merging goes on with the merged box: three boxes collapse into one.
    chain = np.array([[0, 0, 9, 9], [0, 0, 9, 10], [0, 0, 9, 11]], float)
    assert len(merging.greedy_merge(chain, np.ones(3), min_iou=0.8)[0]) == 1
    box, score = merging.best_box(boxes_in, scores, 0.5)
    assert score == 4.0 and box[0] == 0.75


def test_dense_outputs_map_back_to_the_image():
    """A 100 x 50 image at Q = 64 is 128 x 64; a 64-pixel window every 32 pixels; the
    centre box (0.5, 0.5, 0.5, 0.5) of window j is rescaled pixels [16 + 32j, 48 + 32j)."""
    centres = np.tile([0.5, 0.5, 0.5, 0.5], (1, 3, 1))  # a 1 x 3 map
    mapped = dense.view_boxes(centres, 100, 50, 64, (64, 128), 64)
    j = np.arange(3)
    np.testing.assert_allclose(mapped[0, :, 0], 12.5 + 25 * j)
    np.testing.assert_allclose(mapped[0, :, 2], 36.5 + 25 * j)
    np.testing.assert_allclose(mapped[0, :, [1, 3]].T, [[12.5, 36.5]] * 3)
    # A view cropped from the rescaled image (a dense bucket) shifts every window.
    shifted = dense.view_boxes(centres[:, :1], 100, 50, 64, (64, 96), 64)
    np.testing.assert_allclose(shifted[0, 0, 0], (16 + 16) / 1.28)
    # The central crop is the one-location case; a box beyond the image is clipped.
    crop = dense.view_boxes(np.array([[[0.5, 0.5, 2.0, 2.0]]]), 100, 50, 64, (64, 64), 64)
    np.testing.assert_allclose(crop[0, 0], [0, 0, 99, 49])


def test_an_images_guesses_merge_each_class_separately():
    candidates = np.array([[[0, 0, 9, 9], [20, 20, 29, 29]],
                           [[1, 1, 10, 10], [40, 40, 49, 49]]], float)  # [L=2, G=2, 4]
    scores = np.array([[0.9, 0.2], [0.8, 0.3]])
    classes, guesses = dense.image_guesses(np.array([7, 2]), candidates, scores, 0.5)
    assert classes.tolist() == [7, 2]
    np.testing.assert_allclose(guesses[0], (0.9 * np.array([0, 0, 9, 9])
                                            + 0.8 * np.array([1, 1, 10, 10])) / 1.7)
    np.testing.assert_allclose(guesses[1], [40, 40, 49, 49])  # no merge; the higher score
