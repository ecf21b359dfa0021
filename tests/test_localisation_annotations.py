"""Box annotations in both of ImageNet's forms, their known faults, and the join with images."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from vgg_jax.data import sources
from vgg_jax.localisation import annotations, canvas, source

_XML = """<annotation>
  <folder>{folder}</folder><filename>{name}</filename>
  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>
  {objects}
</annotation>"""
_OBJECT = ("<object><name>{name}</name><bndbox><xmin>{0}</xmin><ymin>{1}</ymin>"
           "<xmax>{2}</xmax><ymax>{3}</ymax></bndbox></object>")


def _write_xml(directory, stem, objects, width=100, height=80, folder="n01"):
    os.makedirs(directory, exist_ok=True)
    body = "".join(_OBJECT.format(*box, name=name) for name, box in objects)
    with open(os.path.join(directory, f"{stem}.xml"), "w") as f:
        f.write(_XML.format(folder=folder, name=stem, width=width, height=height,
                            objects=body))


def test_ilsvrc_xml_with_its_known_faults(tmp_path):
    root = str(tmp_path / "Annotations" / "CLS-LOC" / "train")
    _write_xml(os.path.join(root, "n01"), "n01_1", [
        ("n01", (10, 5, 40, 30)),         # fine
        ("n01", (-3, 5, 120, 30)),        # reaches outside the 100 x 80 image: clipped
        ("n01", (150, 5, 160, 30)),       # wholly outside: skipped
        ("n01", (40, 5, 10, 30)),         # min > max: skipped
        ("n01", ("abc", 5, 10, 30)),      # not a number: skipped
        ("dog", (20, 20, 30, 30)),        # named by a word: kept here, the join decides
    ])
    _write_xml(os.path.join(root, "n02"), "n02_7", [("n02", (0, 0, 99, 79))])
    with open(os.path.join(root, "n02", "broken.xml"), "w") as f:
        f.write("<annotation><object>")
    read = annotations.read_annotations(root)
    assert sorted(read.boxes) == ["n01_1", "n02_7"]
    assert read.names["n01_1"] == ["n01", "n01", "dog"]
    np.testing.assert_array_equal(read.boxes["n01_1"], [[10, 5, 40, 30], [0, 5, 99, 30],
                                                        [20, 20, 30, 30]])
    assert read.faults == {annotations.CLIPPED: 1, annotations.OUTSIDE: 1,
                           annotations.INVERTED: 1, annotations.NOT_A_NUMBER: 1,
                           annotations.UNREADABLE: 1}
    single = annotations.read_annotations(os.path.join(root, "n02", "n02_7.xml"))
    assert list(single.boxes) == ["n02_7"]


def test_kaggle_csv_with_its_known_faults(tmp_path):
    path = tmp_path / "LOC_val_solution.csv"
    path.write_text(
        "ImageId,PredictionString\n"
        "ILSVRC2012_val_00000001,n01 10 20 30 40 n01 1 2 3 4 \n"
        "ILSVRC2012_val_00000002,n02 50 20 30 40 n02 nan 2 3 4 n02 5 6\n"  # inverted, NaN, tail
        "ILSVRC2012_val_00000003,n03 -5 -5 900 900\n")  # no size here: clipped when read
    read = annotations.read_annotations(str(path))
    assert sorted(read.boxes) == ["ILSVRC2012_val_00000001", "ILSVRC2012_val_00000003"]
    np.testing.assert_array_equal(read.boxes["ILSVRC2012_val_00000001"],
                                  [[10, 20, 30, 40], [1, 2, 3, 4]])
    assert read.faults == {annotations.INVERTED: 1, annotations.NOT_A_NUMBER: 1,
                           annotations.INCOMPLETE: 1}


def test_another_file_or_path_is_a_clear_error(tmp_path):
    wrong = tmp_path / "labels.csv"
    wrong.write_text("file,label\na.jpg,3\n")
    with pytest.raises(ValueError, match="not a Kaggle localisation file"):
        annotations.read_annotations(str(wrong))
    with pytest.raises(ValueError, match="neither a Kaggle CSV"):
        annotations.read_annotations(str(tmp_path / "missing"))


def _image_folder(root):
    """val/n01/{a,b,c}.jpg and val/n02/d.jpg, 40 x 30 each."""
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (90, 90, 90)).save(buffer, "JPEG")
    for cls, names in (("n01", "abc"), ("n02", "d")):
        os.makedirs(os.path.join(root, "val", cls))
        for name in names:
            with open(os.path.join(root, "val", cls, f"{name}.jpg"), "wb") as f:
                f.write(buffer.getvalue())


def test_join_keeps_the_images_own_class_and_counts_the_rest(tmp_path):
    _image_folder(str(tmp_path))
    images = sources.FolderSource(str(tmp_path), "val")
    csv = tmp_path / "boxes.csv"
    csv.write_text("ImageId,PredictionString\n"
                   "a,n01 1 1 10 10 n02 2 2 5 5 dog 3 3 9 9\n"  # own, other class, a word
                   "b,n02 1 1 10 10\n"                          # only another class's box
                   "d,n02 0 0 39 29\n"
                   "zzz,n01 1 1 2 2\n")                         # an image the split lacks
    keys, labels = source.image_index(images)
    assert keys == ["a", "b", "c", "d"] and labels.tolist() == [0, 0, 0, 1]
    joined = source.join(images, annotations.read_annotations(str(csv)), keys, labels,
                         source.class_synsets(images))
    assert len(joined) == 2  # a and d: b lost its only box, c has none
    record = joined[0]
    assert record["label"] == 0 and record["name"].endswith("a.jpg")
    np.testing.assert_array_equal(record["boxes"], [[1, 1, 10, 10], [3, 3, 9, 9]])
    np.testing.assert_array_equal(joined.boxes(1), [[0, 0, 39, 29]])
    assert joined.faults == {source.WORD_NAMED: 1, source.OTHER_CLASS: 2, source.NO_BOX: 2,
                             source.UNMATCHED: 1}
    assert "images_with_boxes=2" in repr(joined)


def test_the_digits_canvases_box_every_digits_ink(tmp_path):
    settings = {"size": 48, "digit_min": 18, "digit_max": 36, "aspect_jitter": 0.15,
                "copies": 1, "strokes": 0, "blobs": 0, "noise_std": 0.0, "seed": 0,
                "max_digits": 4, "val_fraction": 0.2, "split_seed": 0, "jpeg_quality": 95}
    digits, _ = canvas._digits(settings)[canvas.TRAIN_DIR]
    for n, digit in enumerate(digits):
        image, (xmin, ymin, xmax, ymax) = canvas.render(digit, np.random.default_rng(n),
                                                        settings)
        ink = image >= canvas.INK_LEVEL  # no clutter: only the digit is this bright
        rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
        assert (cols.min(), rows.min(), cols.max(), rows.max()) == (xmin, ymin, xmax, ymax)
        assert 18 * 0.5 <= xmax - xmin + 1 <= 36 * 1.15 + 1


class _RecordsOnly:
    """A source that, like a TFDS split, knows its images' names only from their records."""

    def __init__(self):
        self.reads = 0

    def __len__(self):
        return 3

    def __getitem__(self, index):
        self.reads += 1
        return {"image": b"", "label": index % 2, "name": f"n0{index % 2}_{index}.JPEG"}

    def __repr__(self):
        return "RecordsOnly(3)"


def test_a_tfds_splits_names_are_read_once_then_cached(tmp_path):
    images = _RecordsOnly()
    keys, labels = source.image_index(images, str(tmp_path))
    assert keys == ["n00_0", "n01_1", "n00_2"] and labels.tolist() == [0, 1, 0]
    assert images.reads == 3
    again = _RecordsOnly()
    keys_again, labels_again = source.image_index(again, str(tmp_path))
    assert (keys_again, labels_again.tolist(), again.reads) == (keys, [0, 1, 0], 0)
