"""ConvNet configuration A-LRN of the paper's Table 1: A with local response normalisation
after the first conv layer.

Train on ImageNet (a TFDS imagenet2012 build, or an image folder with train/ and val/):
  python main.py --config=configs/vgg_a_lrn.py --workdir=runs/vgg_a_lrn \
      --config.data.data_dir=/path/to/tensorflow_datasets
  python main.py --config=configs/vgg_a_lrn.py --workdir=runs/vgg_a_lrn \
      --config.data.source=folder --config.data.data_dir=/path/to/imagenet
Training scale variants (paper 3.1): configs/vgg_a_lrn.py:384 and configs/vgg_a_lrn.py:256-512.

Expected result on the ILSVRC-2012 validation set, from the paper:
  S=256, Q=256, dense evaluation: top-1 29.7%, top-5 10.5% (Table 3; LRN does not help).
"""

from configs import base


def get_config(train_scale: str = "256"):
    """Returns the recipe for net A-LRN.

    Args:
      train_scale: "256", "384" or "256-512" (see `base.set_train_scale`).

    Returns:
      The base recipe with model.version set to "A_LRN".
    """
    config = base.set_train_scale(base.get_config(), train_scale)
    config.model.version = "A_LRN"
    return config
