"""ConvNet configuration A of the paper's Table 1: 11 weight layers, the shallowest net.

The paper trained it from random initialisation and used it to initialise the deeper nets.

Train on ImageNet (a TFDS imagenet2012 build, or an image folder with train/ and val/):
  python main.py --config=configs/vgg_a.py --workdir=runs/vgg_a \
      --config.data.data_dir=/path/to/tensorflow_datasets
  python main.py --config=configs/vgg_a.py --workdir=runs/vgg_a \
      --config.data.source=folder --config.data.data_dir=/path/to/imagenet
Training scale variants (paper 3.1): configs/vgg_a.py:384 and configs/vgg_a.py:256-512.

Expected result on the ILSVRC-2012 validation set, from the paper:
  S=256, Q=256, dense evaluation: top-1 29.6%, top-5 10.4% (Table 3).
"""

from configs import base


def get_config(train_scale: str = "256"):
    """Returns the recipe for net A.

    Args:
      train_scale: "256", "384" or "256-512" (see `base.set_train_scale`).

    Returns:
      The base recipe with model.version set to "A".
    """
    config = base.set_train_scale(base.get_config(), train_scale)
    config.model.version = "A"
    return config
