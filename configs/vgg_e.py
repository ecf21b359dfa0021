"""ConvNet configuration E of the paper's Table 1: 19 weight layers, all 3x3 (VGG-19).

Train on ImageNet (a TFDS imagenet2012 build, or an image folder with train/ and val/):
  python main.py --config=configs/vgg_e.py --workdir=runs/vgg_e \
      --config.data.data_dir=/path/to/tensorflow_datasets
  python main.py --config=configs/vgg_e.py --workdir=runs/vgg_e \
      --config.data.source=folder --config.data.data_dir=/path/to/imagenet
Training scale variants (paper 3.1): configs/vgg_e.py:384 and configs/vgg_e.py:256-512.

The paper initialised this net from a trained net A (its first four conv layers and its
three FC layers); Glorot initialisation, the default here, trains it from scratch as well.
To follow the paper, add:
  --config.init_from=runs/vgg_a \
  --config.init_from_layers="('conv1_1','conv2_1','conv3_1','conv3_2','fc6','fc7','fc8')"

Expected result on the ILSVRC-2012 validation set, from the paper:
  top-1 / top-5, dense evaluation (the default eval.protocol) at one test scale,
  Table 3: S=256 27.3% / 9.0%; S=384 26.9% / 8.7%;
  S in [256,512], Q=384 25.5% / 8.0%.
  Multi-scale dense + multi-crop testing of the jittered net: 24.4% / 7.1% (Table 5).
"""

from configs import base


def get_config(train_scale: str = "256"):
    """Returns the recipe for net E.

    Args:
      train_scale: "256", "384" or "256-512" (see `base.set_train_scale`).

    Returns:
      The base recipe with model.version set to "E".
    """
    config = base.set_train_scale(base.get_config(), train_scale)
    config.model.version = "E"
    return config
