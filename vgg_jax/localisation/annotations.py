"""Bounding-box annotations in the two forms ImageNet users hold, with their faults counted.

- ILSVRC's XML (`Annotations/CLS-LOC/{train,val}/...xml`, PASCAL VOC style): one file per
  image, named after it, with the image's `<size>` and one `<object>` per box: a `<name>`
  (a WordNet synset such as n01440764) and a `<bndbox>` of xmin, ymin, xmax, ymax.
- Kaggle's `LOC_train_solution.csv` / `LOC_val_solution.csv`: a header
  `ImageId,PredictionString`, then one row per image: its file name without extension and
  `synset xmin ymin xmax ymax` repeated, in pixels.

Coordinates are read as pixel boxes (the first and last pixel inside the box, 0-based;
vgg_jax.localisation.boxes). The real files have known faults, none of them fatal: each
is clipped or skipped here and counted by name in `Annotations.faults`:

- a box reaching outside its image (XML, whose size is known here) is clipped to it; one
  wholly outside is skipped (Kaggle's rows carry no size: their boxes are clipped when the
  image is read, and evaluation counts them);
- a box whose min exceeds its max, a coordinate that is not a number, a row whose tokens
  do not come in fives, or a file that does not parse, is skipped;
- objects named by a word ("dog") instead of a synset are kept here; joining them to their
  image (vgg_jax.localisation.source) decides.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import logging
import os
import xml.etree.ElementTree as ElementTree

import numpy as np

from vgg_jax.localisation.boxes import BOX_SIZE, clip_pixel_boxes

logger = logging.getLogger(__name__)

# The faults counted (keys of Annotations.faults), as a user reads them in the log.
CLIPPED = "boxes reaching outside their image, clipped"
OUTSIDE = "boxes wholly outside their image, skipped"
INVERTED = "boxes whose min exceeds their max, skipped"
NOT_A_NUMBER = "boxes with a coordinate that is not a number, skipped"
INCOMPLETE = "rows whose tokens do not come in fives (synset and 4 coordinates), tail skipped"
UNREADABLE = "annotation files that do not parse, skipped"
# Kaggle's CSV header and its two columns.
CSV_COLUMNS = ("ImageId", "PredictionString")
# One box in a PredictionString: the synset and four coordinates.
_TOKENS_PER_BOX = 1 + BOX_SIZE
_XML_COORDINATES = ("xmin", "ymin", "xmax", "ymax")


@dataclasses.dataclass
class Annotations:
    """The boxes of a split, by image.

    Attributes:
      names: image key (its file name without directory or extension) -> the object names
        of its boxes (synsets, or words where the file has them).
      boxes: image key -> float64 [K, 4] pixel boxes, in the order of `names`.
      faults: fault -> count (the module docstring's list).
    """

    names: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    boxes: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    faults: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def add(self, key: str, names: list[str], boxes: list[list[float]]) -> None:
        """Adds an image's boxes (appended to any it already has)."""
        if not names:
            return
        array = np.asarray(boxes, np.float64).reshape(-1, BOX_SIZE)
        if key in self.boxes:
            self.names[key] += names
            self.boxes[key] = np.concatenate([self.boxes[key], array])
        else:
            self.names[key], self.boxes[key] = list(names), array


def image_key(path: str) -> str:
    """The key joining an image to its boxes: its file name without directory or extension.

    Args:
      path: a file path or name ("train/n01440764/n01440764_10026.JPEG", an XML file,
        TFDS's file_name or Kaggle's ImageId).

    Returns:
      e.g. "n01440764_10026".
    """
    return os.path.splitext(os.path.basename(str(path)))[0]


def _numbers(tokens: list[str]) -> list[float] | None:
    try:
        values = [float(t) for t in tokens]
    except ValueError:
        return None
    return values if all(np.isfinite(values)) else None


def _check_box(values: list[float] | None, faults: collections.Counter) -> bool:
    """Counts a box that cannot be used; True when it can."""
    if values is None:
        faults[NOT_A_NUMBER] += 1
        return False
    if values[0] > values[2] or values[1] > values[3]:
        faults[INVERTED] += 1
        return False
    return True


def read_kaggle_csv(path: str) -> Annotations:
    """Reads Kaggle's LOC_{train,val}_solution.csv.

    Args:
      path: the CSV file.

    Returns:
      The Annotations (no box is clipped: the rows carry no image size).

    Raises:
      ValueError: when the file's header is not Kaggle's (another file given by mistake).
    """
    annotations = Annotations()
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header[:2]) != CSV_COLUMNS:
            raise ValueError(
                f"{path} is not a Kaggle localisation file: its header is {header}, expected "
                f"{','.join(CSV_COLUMNS)}; pass LOC_train_solution.csv or LOC_val_solution.csv.")
        for row in reader:
            if not row:
                continue
            tokens = row[1].split() if len(row) > 1 else []
            whole = len(tokens) - len(tokens) % _TOKENS_PER_BOX
            if whole != len(tokens):
                annotations.faults[INCOMPLETE] += 1
            names, boxes = [], []
            for start in range(0, whole, _TOKENS_PER_BOX):
                values = _numbers(tokens[start + 1 : start + _TOKENS_PER_BOX])
                if _check_box(values, annotations.faults):
                    names.append(tokens[start])
                    boxes.append(values)
            annotations.add(image_key(row[0].strip()), names, boxes)
    return annotations


def _xml_objects(path: str, faults: collections.Counter
                 ) -> tuple[list[str], list[list[float]], tuple[int, int] | None]:
    """The names, boxes and image size (None when absent) of one ILSVRC XML file."""
    root = ElementTree.parse(path).getroot()
    size = None
    width, height = root.findtext("size/width"), root.findtext("size/height")
    if width and height and _numbers([width, height]) and min(_numbers([width, height])) > 0:
        size = (int(float(width)), int(float(height)))
    names, boxes = [], []
    for element in root.iter("object"):
        values = _numbers([element.findtext(f"bndbox/{c}") or "" for c in _XML_COORDINATES])
        if _check_box(values, faults):
            names.append((element.findtext("name") or "").strip())
            boxes.append(values)
    return names, boxes, size


def _xml_files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    found = []
    for directory, _, files in os.walk(path):
        found += [os.path.join(directory, f) for f in files if f.lower().endswith(".xml")]
    return sorted(found)


def read_ilsvrc_xml(path: str) -> Annotations:
    """Reads ILSVRC's XML annotations: a directory (searched recursively) or one file.

    Boxes reaching outside the image size the file gives are clipped to it.

    Args:
      path: e.g. ILSVRC/Annotations/CLS-LOC/val, or a single .xml file.

    Returns:
      The Annotations, keyed by each XML file's name without extension.
    """
    annotations = Annotations()
    for file in _xml_files(path):
        try:
            names, boxes, size = _xml_objects(file, annotations.faults)
        except (ElementTree.ParseError, OSError, UnicodeDecodeError):
            annotations.faults[UNREADABLE] += 1
            continue
        if size is not None and boxes:
            clipped, changed, kept = clip_pixel_boxes(np.asarray(boxes), *size)
            annotations.faults[CLIPPED] += int(np.sum(changed & kept))
            annotations.faults[OUTSIDE] += int(np.sum(~kept))
            names = [n for n, k in zip(names, kept) if k]
            boxes = clipped[kept].tolist()
        annotations.add(image_key(file), names, boxes)
    return annotations


def read_annotations(path: str) -> Annotations:
    """Reads a split's boxes in either form, chosen by the path.

    Args:
      path: a Kaggle CSV file (.csv), or ILSVRC's XML (a directory of .xml files or one).

    Returns:
      The Annotations; its faults are also logged in one line.

    Raises:
      ValueError: for a path that does not exist or is neither form.
    """
    path = os.path.expanduser(str(path))
    if path.lower().endswith(".csv") and os.path.isfile(path):
        annotations = read_kaggle_csv(path)
    elif os.path.isdir(path) or (path.lower().endswith(".xml") and os.path.isfile(path)):
        annotations = read_ilsvrc_xml(path)
    else:
        raise ValueError(
            f"Box annotations {path!r} are neither a Kaggle CSV file (LOC_val_solution.csv) "
            "nor ILSVRC's XML (a directory such as Annotations/CLS-LOC/val); fix "
            "config.localisation.train_annotations / eval_annotations.")
    if annotations.faults:
        logger.warning("Annotations %s: %s.", path, "; ".join(
            f"{count} {fault}" for fault, count in sorted(annotations.faults.items())))
    return annotations
