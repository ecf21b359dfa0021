"""Prepares a TFDS data set once in the array_record format read by `sources.TfdsSource`.

Needs TensorFlow (not a dependency of vgg-jax, only of this one-off step):

  pip install tensorflow-cpu
  python -m vgg_jax.data.prepare_tfds --name=imagenet2012 --data_dir=/data/tfds \
      --manual_dir=/data/ilsvrc  # holds ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar

Data sets that TFDS can download (cifar10, mnist, ...) need no --manual_dir. This calls
the Python API because the `tfds build` command line of tensorflow-datasets 4.9.10 fails
at import without apache_beam.
"""

from __future__ import annotations

import argparse


def prepare(name: str, data_dir: str | None, manual_dir: str | None) -> None:
    """Downloads (or reads from manual_dir) and writes `name` as array_record under data_dir.

    Args:
      name: the TFDS name, e.g. "imagenet2012".
      data_dir: the TFDS data directory (None: ~/tensorflow_datasets).
      manual_dir: the directory of manually downloaded archives (imagenet2012's tars).
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
    print(f"Prepared {name} in {builder.data_dir}: {dict(builder.info.splits)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="TFDS name, e.g. imagenet2012")
    parser.add_argument("--data_dir", default=None, help="TFDS data directory")
    parser.add_argument("--manual_dir", default=None, help="dir of the ILSVRC2012 tar files")
    args = parser.parse_args()
    prepare(args.name, args.data_dir, args.manual_dir)


if __name__ == "__main__":
    main()
