"""ConvNet configuration C of the paper's Table 1: 16 weight layers, three of them 1x1
convolutions.

  python main.py --config=configs/vgg_c.py --workdir=runs/vgg_c \
      --config.data.data_dir=/path/to/tensorflow_datasets
Variants ':384' and ':256-512', image folders and the paper's initialisation from net A:
see configs/base.py.

The paper's results on the ILSVRC-2012 validation set (top-1 / top-5 error, %):
  Table 3 (dense, one test scale): S=256 28.1 / 9.4; S=384 28.1 / 9.3;
    S in [256,512] (Q=384) 27.3 / 8.8.
  Table 4 (dense, three test scales): 27.7 / 9.2; 27.8 / 9.2; 26.3 / 8.2.
"""

from configs import base


def get_config(train_scale: str = "256"):
    """Returns net C's recipe; `train_scale` as in `base.paper_config`."""
    return base.paper_config("C", train_scale)
