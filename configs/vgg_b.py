"""ConvNet configuration B of the paper's Table 1: 13 weight layers.

Train on ImageNet (a TFDS imagenet2012 build, or an image folder with train/ and val/):
  python main.py --config=configs/vgg_b.py --workdir=runs/vgg_b \
      --config.data.data_dir=/path/to/tensorflow_datasets
  python main.py --config=configs/vgg_b.py --workdir=runs/vgg_b \
      --config.data.source=folder --config.data.data_dir=/path/to/imagenet
Training scale variants (paper 3.1): configs/vgg_b.py:384 and configs/vgg_b.py:256-512.

The paper initialised this net from a trained net A (its first four conv layers and its
three FC layers); Glorot initialisation, the default here, trains it from scratch as well.
To follow the paper, add:
  --config.init_from=runs/vgg_a \
  --config.init_from_layers="('conv1_1','conv2_1','conv3_1','conv3_2','fc6','fc7','fc8')"

Expected result on the ILSVRC-2012 validation set, from the paper:
  S=256, Q=256, dense evaluation: top-1 28.7%, top-5 9.9% (Table 3);
  multi-scale test: 28.2% / 9.6% (Table 4).
"""

from configs import base


def get_config(train_scale: str = "256"):
    """Returns the recipe for net B.

    Args:
      train_scale: "256", "384" or "256-512" (see `base.set_train_scale`).

    Returns:
      The base recipe with model.version set to "B".
    """
    config = base.set_train_scale(base.get_config(), train_scale)
    config.model.version = "B"
    return config
