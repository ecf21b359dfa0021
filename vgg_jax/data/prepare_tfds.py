"""Prepares a TFDS data set once in the array_record format read by `sources.TfdsSource`.

Needs TensorFlow and importlib_resources (not dependencies of vgg-jax, only of this
one-off step; reading the prepared set needs neither):

  pip install -e ".[prepare]"   # or: pip install tensorflow-cpu importlib-resources
  python -m vgg_jax.data.prepare_tfds --name=imagenet2012 --data_dir=/data/tfds \
      --manual_dir=/data/ilsvrc  # holds ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar

Data sets that TFDS can download (cifar10, mnist, ...) need no --manual_dir. This calls
the Python API because the `tfds build` command line of tensorflow-datasets 4.9.10 fails
at import without apache_beam. tensorflow-datasets 4.9.10 imports `importlib_resources`
when it prepares a data set without declaring it (etils 1.15's epath extra no longer
brings it).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence

from absl import app, flags

# (module, pip package) that preparing needs beyond vgg-jax's own dependencies.
REQUIREMENTS = (("tensorflow", "tensorflow-cpu"), ("importlib_resources", "importlib-resources"))


class MissingRequirementsError(ImportError):
    """TensorFlow or importlib_resources is not installed; the message names the fix."""


def missing_requirements() -> list[str]:
    """The pip packages of REQUIREMENTS whose module cannot be imported here.

    Returns:
      The pip package names to install, empty when preparing can run.
    """
    return [package for module, package in REQUIREMENTS if importlib.util.find_spec(module) is None]


def prepare(name: str, data_dir: str | None, manual_dir: str | None) -> dict[str, int]:
    """Downloads (or reads from manual_dir) and writes `name` as array_record under data_dir.

    Args:
      name: the TFDS name, e.g. "imagenet2012".
      data_dir: the TFDS data directory (None: ~/tensorflow_datasets).
      manual_dir: the directory of manually downloaded archives (imagenet2012's tars).

    Returns:
      The number of examples of every prepared split.

    Raises:
      MissingRequirementsError: if TensorFlow or importlib_resources is missing.
    """
    missing = missing_requirements()
    if missing:
        raise MissingRequirementsError(
            f"Preparing a TFDS data set needs {' and '.join(missing)}, which are not installed "
            f"in {sys.prefix}; run `pip install {' '.join(missing)}` (or `pip install -e "
            '".[prepare]"` in the vgg-jax repository). Reading the prepared set needs neither.'
        )
    import tensorflow_datasets as tfds

    data_dir = os.path.expanduser(data_dir) if data_dir else None
    manual_dir = os.path.expanduser(manual_dir) if manual_dir else None
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
    counts = {str(split): info.num_examples for split, info in builder.info.splits.items()}
    print(f"Prepared {name} in {builder.data_dir}: {counts}")
    return counts


def define_flags() -> None:
    """The command's flags (defined when run, so that importing this module defines none)."""
    flags.DEFINE_string("name", None, "TFDS name, e.g. imagenet2012.", required=True)
    flags.DEFINE_string("data_dir", None, "TFDS data directory (default: TFDS's own).")
    flags.DEFINE_string("manual_dir", None, "Directory of the ILSVRC2012 tar files.")


def main(argv: Sequence[str]) -> None:
    """Command line: python -m vgg_jax.data.prepare_tfds --name=NAME [--data_dir=DIR]."""
    if len(argv) > 1:
        sys.exit(f"Unexpected arguments {' '.join(argv[1:])}; see --help.")
    f = flags.FLAGS
    try:
        prepare(f.name, f.data_dir, f.manual_dir)
    except MissingRequirementsError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
