"""The paper's transfer protocol (Appendix B): a trained net's penultimate-layer features,
computed densely at several scales, classified by a linear SVM on another data set.

  python -m vgg_jax.transfer --workdir=runs/vgg_d --config=configs/transfer.py:caltech101 \
      --config.data.data_dir=~/tensorflow_datasets
  python -m vgg_jax.transfer --workdir=runs/quickstart --config=configs/transfer.py:digits
  python -m vgg_jax.transfer --weights=vgg16 --config=configs/transfer.py:caltech101 ...
  (variants: caltech101, voc2007, digits; any folder: --config.data.source=folder
   --config.data.data_dir=/path with train/<class>/* and test/<class>/* and
   --config.data.eval_split=test)

Descriptors are cached under <workdir>/transfer/ (for a weight file or a hub name:
<config.data.cache_dir>/transfer/<its name>/; config.transfer.cache_dir overrides), so a second
run with other SVM settings or aggregations takes seconds.
"""

import ml_collections

from configs import base

# name: (data source, TFDS name, train split, test split, label key, scales, flip).
_SETTINGS = {
    # The paper's scales for 224 crops; Caltech-101 in TFDS has train and test splits.
    "caltech101": ("tfds", "caltech101", "train", "test", "label", (256, 384, 512), True),
    # Multi-label: every object class in the image (TFDS's "labels"); mAP.
    "voc2007": ("tfds", "voc/2007", "train", "test", "labels", (256, 384, 512), True),
    # The quickstart's digits at the paper's ratios Q = 1, 1.5, 2 x the 32 crop; a mirrored
    # digit is another symbol, so no flip (as the quickstart's own evaluation).
    "digits": ("digits", "digits", "train", "val", "label", (32, 48, 64), False),
}


def get_config(name: str = "caltech101") -> ml_collections.ConfigDict:
    """Returns the transfer settings for one data set.

    Args:
      name: "caltech101", "voc2007" or "digits" (after the colon in --config).

    Returns:
      A config with `data` (as a training run's, read by the same sources) and `transfer`.

    Raises:
      ValueError: for another name.
    """
    if name not in _SETTINGS:
        raise ValueError(f"Unknown transfer data set {name!r}; use one of {', '.join(_SETTINGS)}.")
    source, tfds_name, train_split, test_split, label_key, scales, flip = _SETTINGS[name]
    config = ml_collections.ConfigDict()
    config.data = base.get_config().data
    config.data.source = source
    config.data.name = tfds_name
    config.data.train_split = train_split
    config.data.eval_split = test_split  # the split the SVM is scored on
    # The record field holding the class (one int) or the classes (multi-label, TFDS only).
    config.data.label_key = label_key

    config.transfer = ml_collections.ConfigDict()
    # Test scales Q: the image's shorter side after isotropic rescaling (the paper: 256,
    # 384, 512 for nets with 224 crops); each at least the net's crop size.
    config.transfer.scales = scales
    # Average each descriptor with that of the horizontally flipped image.
    config.transfer.flip = flip
    # Combining the scales: "average", "stack" (concatenate); one result row each.
    config.transfer.aggregations = ("average", "stack")
    # The layer whose map is pooled: the penultimate (the paper's 4096-D features).
    config.transfer.layer = "fc7"
    # Other nets (any weights specs) whose descriptors are stacked with this one's (the
    # paper's best results combine Net-D and Net-E this way).
    config.transfer.combine = ()
    # The linear SVM's regularisation constant C (scikit-learn LinearSVC).
    config.transfer.svm_c = 1.0
    # Per global batch, net inputs of crop size (a dense view counts its area and flip).
    config.transfer.batch_size = 64
    # Dense views are cropped to multiples of this many pixels (fewer compilations).
    config.transfer.dense_size_step = 32
    config.transfer.num_threads = 4
    # Where descriptors are cached; "" = <workdir>/transfer, or for a weight file or a hub
    # name <config.data.cache_dir>/transfer/<its name>.
    config.transfer.cache_dir = ""
    config.seed = 0
    return config
