"""ImageNet (ILSVRC-2012) class names, read at run time from tensorflow-datasets' package data.

Nothing is downloaded or copied here: tensorflow-datasets (a dependency) ships the 1000
WordNet ids in the standard class order (`datasets/imagenet2012/labels.txt`, the order of
TFDS's imagenet2012 labels and of torchvision's weights) and, in its SI-Score module, the
1000 human-readable names in that same order. The module is parsed, not imported, so
TensorFlow-datasets' slow import is avoided.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os

NUM_CLASSES = 1000
_NAMES_FILE = os.path.join("datasets", "siscore", "labels.py")
_NAMES_VARIABLE = "IMAGENET_LABELS_LIST"
_WNIDS_FILE = os.path.join("datasets", "imagenet2012", "labels.txt")


def _tfds_dir() -> str | None:
    spec = importlib.util.find_spec("tensorflow_datasets")
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(iter(spec.submodule_search_locations))


@functools.cache
def class_names() -> tuple[str, ...] | None:
    """The 1000 ImageNet class names in label order, or None if they cannot be found.

    Each name is WordNet's synonym list, e.g. "tench, Tinca tinca"; see `short_name`.

    Returns:
      NUM_CLASSES names, or None when tensorflow-datasets is not installed or its file
      is missing, unparsable or of another length.
    """
    root = _tfds_dir()
    if root is None:
        return None
    try:
        with open(os.path.join(root, _NAMES_FILE), encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError):
        return None
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and getattr(node.targets[0], "id", None) == _NAMES_VARIABLE):
            try:
                names = tuple(str(n) for n in ast.literal_eval(node.value))
            except ValueError:
                return None
            return names if len(names) == NUM_CLASSES else None
    return None


@functools.cache
def wordnet_ids() -> tuple[str, ...] | None:
    """The 1000 WordNet ids (n01440764, ...) in label order, or None if not found.

    Returns:
      NUM_CLASSES ids, or None when tensorflow-datasets' labels.txt cannot be read or has
      another length.
    """
    root = _tfds_dir()
    if root is None:
        return None
    try:
        with open(os.path.join(root, _WNIDS_FILE), encoding="utf-8") as f:
            ids = tuple(line.strip() for line in f if line.strip())
    except OSError:
        return None
    return ids if len(ids) == NUM_CLASSES else None


def short_name(name: str) -> str:
    """The first synonym of a WordNet name: "tench, Tinca tinca" -> "tench".

    Args:
      name: a name of `class_names`.

    Returns:
      The text before the first comma, stripped.
    """
    return name.split(",")[0].strip()
