"""ConvNet configuration C of the paper's Table 1: 16 weight layers, three of them 1x1 convolutions.

Train on ImageNet (a TFDS imagenet2012 build, or an image folder with train/ and val/):
  python main.py --config=configs/vgg_c.py --workdir=runs/vgg_c \
      --config.data.data_dir=/path/to/tensorflow_datasets
  python main.py --config=configs/vgg_c.py --workdir=runs/vgg_c \
      --config.data.source=folder --config.data.data_dir=/path/to/imagenet
Training scale variants (paper 3.1): configs/vgg_c.py:384 and configs/vgg_c.py:256-512.

The paper initialised this net from a trained net A (its first four conv layers and its
three FC layers); Glorot initialisation, the default here, trains it from scratch as well.
To follow the paper, add:
  --config.init_from=runs/vgg_a \
  --config.init_from_layers="('conv1_1','conv2_1','conv3_1','conv3_2','fc6','fc7','fc8')"

Expected result on the ILSVRC-2012 validation set, from the paper:
  top-1 / top-5, dense evaluation (the default eval.protocol) at one test scale,
  Table 3: S=256 28.1% / 9.4%; S=384 28.1% / 9.3%;
  S in [256,512], Q=384 27.3% / 8.8%.
"""

from configs import base


def get_config(train_scale: str = "256"):
    """Returns the recipe for net C.

    Args:
      train_scale: "256", "384" or "256-512" (see `base.set_train_scale`).

    Returns:
      The base recipe with model.version set to "C".
    """
    config = base.set_train_scale(base.get_config(), train_scale)
    config.model.version = "C"
    return config
