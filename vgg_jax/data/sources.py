"""Random-access sources of encoded images: TFDS array_record sets, image folders, digits.

Every source is a picklable module-level class with `__len__`, `__getitem__` and a stable
`__repr__` (grain pickles sources into its worker processes and compares `repr(source)`
when an iterator state is restored). A record is a dict:

  {"image": bytes (the encoded file, decoded later by `decode`),
   "label": int,
   "name": str (a file path or "<tfds name>/<split>[<index>]", for warnings)}

Images stay encoded here so that `decode` can decode them at reduced scale. Source
"digits" is an image folder that `digits.prepare_digits` writes once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from vgg_jax.config_values import require
from vgg_jax.data.digits import prepare_digits

SOURCES = ("tfds", "folder", "digits")
# File name extensions (lower case) read by the folder source; anything else (README,
# .DS_Store, label files) in a class folder is ignored.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
# TFDS calls ImageNet's held-out split "validation", image-folder layouts call it "val":
# a folder split named one of these is looked up under either directory name.
FOLDER_SPLIT_ALIASES = {"validation": ("val",), "val": ("validation",)}
# TFDS feature keys of an image-classification data set.
TFDS_IMAGE_KEY = "image"
TFDS_LABEL_KEY = "label"
TFDS_FILE_NAME_KEY = "file_name"


def tfds_prepare_command(name: str, data_dir: str | None) -> str:
    """The shell command that prepares TFDS data set `name` as array_record under `data_dir`.

    Args:
      name: the TFDS name, e.g. "imagenet2012".
      data_dir: the TFDS data directory (None: TFDS's default, ~/tensorflow_datasets).

    Returns:
      A one-line command; for imagenet2012 it expects the ILSVRC tar files in a manual dir.
    """
    data_dir_arg = f" --data_dir={data_dir}" if data_dir else ""
    manual = " --manual_dir=DIR_WITH_ILSVRC2012_TARS" if name == "imagenet2012" else ""
    return (
        "pip install tensorflow-cpu importlib-resources && python -m vgg_jax.data.prepare_tfds "
        f"--name={name}{data_dir_arg}{manual}"
    )


# --------------------------------------------------------------------------------------
# TFDS
# --------------------------------------------------------------------------------------


def _open_tfds(name: str, split: str, data_dir: str | None) -> Any:
    """Opens a TFDS random-access source of undecoded images, or raises a clear ValueError."""
    import tensorflow_datasets as tfds  # Imported lazily: it is slow and folders don't need it.

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(
            f"TFDS has no data set named {name!r} (config.data.name); use a TFDS "
            "image-classification name such as imagenet2012, cifar10, cifar100, mnist or "
            "caltech101."
        ) from e
    try:
        source = tfds.data_source(
            name,
            split=split,
            data_dir=data_dir,
            download=False,
            # Undecoded bytes: we decode with PIL ourselves (at reduced scale, tolerating
            # broken files); TFDS's own decoder would need TensorFlow and raise on them.
            decoders={TFDS_IMAGE_KEY: tfds.decode.SkipDecoding()},
        )
    except Exception as e:  # TFDS raises several unrelated types for "not there".
        where = data_dir or "TFDS's default data_dir (~/tensorflow_datasets)"
        if not builder.is_prepared():
            raise ValueError(
                f"TFDS data set {name!r} is not prepared under {where}; prepare it once "
                f"(needs TensorFlow) with `{tfds_prepare_command(name, data_dir)}`, "
                "see docs/input_pipeline.md."
            ) from e
        splits = sorted(builder.info.splits)
        if split not in builder.info.splits:
            raise ValueError(
                f"TFDS data set {name!r} under {where} has no split {split!r}; its splits "
                f"are {splits}: set config.data.train_split / eval_split."
            ) from e
        raise ValueError(
            f"TFDS data set {name!r} under {where} cannot be read without TensorFlow "
            f"({e.__class__.__name__}: {str(e).splitlines()[0]}); prepare it in the "
            f"array_record format with `{tfds_prepare_command(name, data_dir)}`."
        ) from e
    return source


class TfdsSource:
    """A split of a prepared TFDS image-classification data set (array_record, no TF).

    Args:
      name: the TFDS name, e.g. "imagenet2012" or "cifar10".
      split: the TFDS split, e.g. "train" or "validation".
      data_dir: the TFDS data directory (None: TFDS's default).
    """

    def __init__(self, name: str, split: str, data_dir: str | None):
        self.name = name
        self.split = split
        self.data_dir = data_dir
        # The TFDS data source is itself picklable (built for grain workers).
        self._source = _open_tfds(name, split, data_dir)
        self._len = len(self._source)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._source[int(index)]
        file_name = record.get(TFDS_FILE_NAME_KEY)
        if isinstance(file_name, bytes):
            file_name = file_name.decode("utf-8", "replace")
        name = file_name or f"{self.name}/{self.split}[{int(index)}]"
        return {
            "image": record[TFDS_IMAGE_KEY],
            "label": int(record[TFDS_LABEL_KEY]),
            "name": str(name),
        }

    def __repr__(self) -> str:
        return (
            f"TfdsSource(name={self.name!r}, split={self.split!r}, "
            f"data_dir={self.data_dir!r}, num_examples={self._len})"
        )


def tfds_num_classes(name: str, data_dir: str | None) -> int:
    """The number of classes of a TFDS image-classification data set (from its metadata).

    Args:
      name: the TFDS name, e.g. "cifar10".
      data_dir: the TFDS data directory (None: TFDS's default).

    Returns:
      The `num_classes` of the data set's label feature.
    """
    import tensorflow_datasets as tfds

    return int(tfds.builder(name, data_dir=data_dir).info.features[TFDS_LABEL_KEY].num_classes)


# --------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------


def _require_root(root: str | None) -> str:
    if not root:
        raise ValueError(
            "config.data.data_dir is not set; for source 'folder' pass "
            "--config.data.data_dir=ROOT where ROOT/train/<class>/<image> and "
            "ROOT/val/<class>/<image> exist."
        )
    root = os.path.expanduser(str(root))
    if not os.path.isdir(root):
        raise ValueError(
            f"Image folder {root!r} does not exist; expected ROOT/train/<class>/<image> and "
            "ROOT/val/<class>/<image>: fix --config.data.data_dir."
        )
    return root


def folder_split_dir(root: str, split: str) -> str:
    """The directory of `split` under an image-folder root, or a ValueError naming the fix.

    Args:
      root: the folder root (config.data.data_dir).
      split: the split name (config.data.train_split or eval_split); "validation" and "val"
        are interchangeable.

    Returns:
      The existing directory root/<split> (or its alias).

    Raises:
      ValueError: if the root is unset or missing, or has neither directory.
    """
    root = _require_root(root)
    candidates = (split, *FOLDER_SPLIT_ALIASES.get(split, ()))
    for candidate in candidates:
        path = os.path.join(root, candidate)
        if os.path.isdir(path):
            return path
    present = sorted(e.name for e in os.scandir(root) if e.is_dir())
    # Folder layouts name the held-out split "val" (TFDS: "validation"); suggest that one.
    expected = min(candidates, key=len)
    raise ValueError(
        f"Image folder {root!r} has no split directory {' or '.join(map(repr, candidates))} "
        f"(found {present or 'none'}); expected {root}/{expected}/<class>/<image>: fix "
        "config.data.data_dir or the split name (config.data.train_split / eval_split)."
    )


def folder_class_names(root: str, split: str) -> list[str]:
    """Sorted class folder names of a split; a class index is a position in this list.

    Hidden folders (a leading ".") are skipped.

    Args:
      root: the folder root (config.data.data_dir).
      split: the split name ("validation" and "val" are interchangeable).

    Returns:
      The class folder names, sorted.

    Raises:
      ValueError: if the root or the split directory is missing (see `folder_split_dir`),
        or the split has no class folders (e.g. images directly in it).
    """
    split_dir = folder_split_dir(root, split)
    names = sorted(
        e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not names:
        has_files = any(e.is_file() for e in os.scandir(split_dir))
        what = "images directly in it" if has_files else "nothing in it"
        raise ValueError(
            f"Image folder split {split_dir!r} has no class folders ({what}); expected "
            f"{split_dir}/<class>/<image>, one folder per class."
        )
    return names


def _is_image_file(entry: os.DirEntry) -> bool:
    return (
        entry.is_file()
        and not entry.name.startswith(".")
        and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
    )


class FolderSource:
    """An ImageNet-style folder split: root/<split>/<class>/<image>, read without preparation.

    Args:
      root: the folder root (config.data.data_dir).
      split: the split directory name ("validation" and "val" are interchangeable).
      class_names: the class list fixing label indices (pass the training split's, so a
        validation folder that lacks a class still gets the same indices); None: this
        split's own sorted class folders.
    """

    def __init__(self, root: str, split: str, class_names: Sequence[str] | None = None):
        self.root = _require_root(root)
        self.split = split
        self.split_dir = folder_split_dir(self.root, split)
        own_classes = folder_class_names(self.root, split)
        self.class_names = tuple(class_names) if class_names is not None else tuple(own_classes)
        index_of = {name: i for i, name in enumerate(self.class_names)}
        unknown = sorted(set(own_classes) - set(index_of))
        if unknown:
            raise ValueError(
                f"Image folder split {self.split_dir!r} has class folders {unknown[:5]} that "
                "the training split lacks; every split must use the training split's classes."
            )
        paths, labels = [], []
        for cls in own_classes:
            cls_dir = os.path.join(self.split_dir, cls)
            files = sorted(e.name for e in os.scandir(cls_dir) if _is_image_file(e))
            paths.extend(os.path.join(cls, f) for f in files)
            labels.extend([index_of[cls]] * len(files))
        if not paths:
            raise ValueError(
                f"Image folder split {self.split_dir!r} has class folders but no image files "
                f"(extensions {sorted(IMAGE_EXTENSIONS)}) in them."
            )
        # Compact arrays rather than a list of str: the source is pickled into every grain
        # worker, and ImageNet's 1.28M paths as Python strings cost several times more.
        self._paths = np.array([os.fsencode(p) for p in paths])
        self._labels = np.asarray(labels, dtype=np.int32)

    def __len__(self) -> int:
        return len(self._labels)

    def file_names(self) -> list[str]:
        """Every image's path relative to the split directory ("<class>/<file>"), in index
        order, without reading any image (localisation joins boxes to images by name)."""
        return [os.fsdecode(p) for p in self._paths]

    def labels(self) -> np.ndarray:
        """Every image's label, int32 [len(self)], in index order, without reading any image."""
        return self._labels.copy()

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = os.path.join(self.split_dir, os.fsdecode(self._paths[int(index)]))
        with open(path, "rb") as f:
            data = f.read()
        return {"image": data, "label": int(self._labels[int(index)]), "name": path}

    def __repr__(self) -> str:
        return (
            f"FolderSource(root={self.root!r}, split={self.split!r}, "
            f"num_examples={len(self)}, num_classes={len(self.class_names)})"
        )


# --------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------


def check_config(data_config: Any) -> None:
    """Raises ConfigError for a bad source field of config.data (source, data_dir,
    val_fraction); part of `pipeline.check_config`. No file is opened: `validate_source`."""
    d = data_config
    require(d.source in SOURCES, f"config.data.source={d.source!r} is unknown; use one of "
            f"{SOURCES}.")
    if d.source == "digits":
        require(0 < d.val_fraction < 1,
                f"config.data.val_fraction={d.val_fraction} must be in (0, 1): the share of "
                "the digits held out for validation.")
    if d.source in ("tfds", "folder"):
        expected = ("tensorflow_datasets" if d.source == "tfds"
                    else "imagenet (with train/ and val/)")
        require(bool(d.data_dir),
                f"config.data.data_dir is not set for source {d.source!r}; pass "
                f"--config.data.data_dir=/path/to/{expected}, or use "
                "--config=configs/quickstart.py for the offline demo.")


def make_source(data_config: Any, split: str) -> TfdsSource | FolderSource:
    """The random-access source of one split, as selected by config.data.source.

    Args:
      data_config: config.data.
      split: the split name (usually config.data.train_split or eval_split).

    Returns:
      A source whose records are {"image": bytes, "label": int, "name": str}.
    """
    source = str(data_config.source)
    if source == "tfds":
        return TfdsSource(str(data_config.name), split, data_config.data_dir)
    root = prepare_digits(data_config) if source == "digits" else data_config.data_dir
    # Label indices come from the training split's class folders, for every split.
    classes = folder_class_names(root, str(data_config.train_split))
    return FolderSource(root, split, class_names=classes)


def num_classes(data_config: Any) -> int:
    """The number of classes of the configured data set (metadata only, no decoding).

    Args:
      data_config: config.data.

    Returns:
      The class count (for checking against config.model.num_classes).
    """
    source = str(data_config.source)
    if source == "tfds":
        return tfds_num_classes(str(data_config.name), data_config.data_dir)
    root = prepare_digits(data_config) if source == "digits" else data_config.data_dir
    return len(folder_class_names(root, str(data_config.train_split)))


def validate_source(data_config: Any) -> None:
    """Checks cheaply, before any work, that both configured splits can be read.

    Opens the TFDS splits (no decoding), or checks the folder layout (class folders exist
    and each holds at least one image file; no full listing). For source "digits" it writes
    the digits folder first if needed (a second or so).

    Args:
      data_config: config.data.

    Raises:
      ValueError: one sentence naming the path, what was expected and the fix.
    """
    source = str(data_config.source)
    splits = (str(data_config.train_split), str(data_config.eval_split))
    if source == "tfds":
        for split in splits:
            _open_tfds(str(data_config.name), split, data_config.data_dir)
        return
    root = prepare_digits(data_config) if source == "digits" else data_config.data_dir
    train_classes = set(folder_class_names(root, splits[0]))
    for split in splits:
        split_dir = folder_split_dir(root, split)
        classes = folder_class_names(root, split)
        unknown = sorted(set(classes) - train_classes)
        if unknown:
            raise ValueError(
                f"Image folder split {split_dir!r} has class folders {unknown[:5]} that the "
                f"training split {splits[0]!r} lacks; every split must use the training "
                "split's classes."
            )
        for cls in classes:
            with os.scandir(os.path.join(split_dir, cls)) as entries:
                if not any(_is_image_file(e) for e in entries):
                    raise ValueError(
                        f"Class folder {os.path.join(split_dir, cls)!r} holds no image file "
                        f"(extensions {sorted(IMAGE_EXTENSIONS)}); remove it or add its images."
                    )
