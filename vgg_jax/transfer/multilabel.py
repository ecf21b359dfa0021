"""A multi-label TFDS split (VOC: every object class in the image) for the descriptors.

The evaluation plan carries one integer label per image; here the image goes through it
with a placeholder label and the class sets are read once, as a {0, 1} matrix.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vgg_jax.data import sources


class MultiLabelTfds:
    """Records {"image", "label": 0, "name"} of a TFDS split, and its multi-hot labels.

    Args:
      name: the TFDS name (e.g. "voc/2007").
      split: the split.
      data_dir: the TFDS data directory.
      label_key: the feature holding each image's classes (e.g. "labels").
    """

    def __init__(self, name: str, split: str, data_dir: str | None, label_key: str):
        # Imported here: tensorflow-datasets takes seconds to import, and only this source
        # (VOC through TFDS) needs its builder metadata.
        import tensorflow_datasets as tfds

        self.name, self.split = name, split
        # The training sources' reader: undecoded images and one-sentence errors.
        self._source = sources._open_tfds(name, split, data_dir)
        feature = tfds.builder(name, data_dir=data_dir).info.features[label_key]
        num_classes = feature.feature.num_classes
        self.multi_hot = np.zeros((len(self._source), num_classes), np.int64)
        for i in range(len(self._source)):
            self.multi_hot[i, np.asarray(self._source[i][label_key], np.int64)] = 1

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._source[int(index)]
        return {"image": record["image"], "label": 0, "name": f"{self.name}[{int(index)}]"}

    def __repr__(self) -> str:
        return f"MultiLabelTfds(name={self.name!r}, split={self.split!r})"
