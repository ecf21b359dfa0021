"""The names of a net's classes, from its run's config: ImageNet's, the digits', a folder's."""

from __future__ import annotations

from collections.abc import Sequence

from vgg_jax.data import digits, imagenet_classes, sources


def class_names_for(run_config, num_classes: int) -> list[str]:
    """Human-readable class names of a net, or "class <i>" where none are known.

    ImageNet's names for a 1000-class net not trained on a folder, "0" ... "9" for the
    digits, and the training split's class folder names for a folder (when it is still
    there); any list whose length is not `num_classes` is replaced by the generic names.

    Args:
      run_config: the checkpoint's run config (its `data` section is read).
      num_classes: the net's number of classes.

    Returns:
      `num_classes` names, the name of class i at position i.
    """
    names: Sequence[str] | None = None
    data = run_config.get("data", {})
    source = str(data.get("source", ""))
    if num_classes == imagenet_classes.NUM_CLASSES and source != "folder":
        names = imagenet_classes.class_names()
    elif source == "digits" and num_classes == digits.DIGITS_NUM_CLASSES:
        names = [str(i) for i in range(digits.DIGITS_NUM_CLASSES)]
    elif source == "folder" and data.get("data_dir"):
        try:
            names = sources.folder_class_names(data.data_dir, str(data.train_split))
        except (ValueError, OSError):
            names = None
    if names is None or len(names) != num_classes:
        return [f"class {i}" for i in range(num_classes)]
    return list(names)
