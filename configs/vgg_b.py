"""ConvNet configuration B of the paper's Table 1: 13 weight layers.

  python main.py --config=configs/vgg_b.py --workdir=runs/vgg_b \
      --config.data.data_dir=/path/to/tensorflow_datasets
Variants ':384' and ':256-512', image folders and the paper's initialisation from net A:
see configs/base.py.

The paper's results on the ILSVRC-2012 validation set (top-1 / top-5 error, %):
  Table 3 (dense, one test scale): S=256 28.7 / 9.9.
  Table 4 (dense, three test scales): S=256 28.2 / 9.6.
"""

from configs import base


def get_config(train_scale: str = "256"):
    """Returns net B's recipe; `train_scale` as in `base.paper_config`."""
    return base.paper_config("B", train_scale)
