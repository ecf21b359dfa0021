"""ConvNet configuration A of the paper's Table 1: 11 weight layers, the shallowest net.

The paper trained it from random initialisation and used it to initialise the deeper nets.

  python main.py --config=configs/vgg_a.py --workdir=runs/vgg_a \
      --config.data.data_dir=/path/to/tensorflow_datasets
Variants ':384' and ':256-512', image folders and the paper's initialisation from net A:
see configs/base.py.

The paper's results on the ILSVRC-2012 validation set (top-1 / top-5 error, %):
  Table 3 (dense, one test scale): S=256 29.6 / 10.4.
"""

from configs import base


def get_config(train_scale: str = "256"):
    """Returns net A's recipe; `train_scale` as in `base.paper_config`."""
    return base.paper_config("A", train_scale)
