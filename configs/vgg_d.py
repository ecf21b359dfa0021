"""ConvNet configuration D of the paper's Table 1: 16 weight layers, all 3x3 (VGG-16).

  python main.py --config=configs/vgg_d.py --workdir=runs/vgg_d \
      --config.data.data_dir=/path/to/tensorflow_datasets
Variants ':384' and ':256-512', image folders and the paper's initialisation from net A:
see configs/base.py.

The paper's results on the ILSVRC-2012 validation set (top-1 / top-5 error, %):
  Table 3 (dense, one test scale): S=256 27.0 / 8.8; S=384 26.8 / 8.7;
    S in [256,512] (Q=384) 25.6 / 8.1.
  Table 4 (dense, three test scales): 26.6 / 8.6; 26.5 / 8.6; 24.8 / 7.5.
  Table 5 (S in [256,512], dense + multi-crop over three scales): 24.4 / 7.2.
"""

from configs import base


def get_config(train_scale: str = "256"):
    """Returns net D's recipe; `train_scale` as in `base.paper_config`."""
    return base.paper_config("D", train_scale)
