"""ConvNet configuration E of the paper's Table 1: 19 weight layers, all 3x3 (VGG-19).

  python main.py --config=configs/vgg_e.py --workdir=runs/vgg_e \
      --config.data.data_dir=/path/to/tensorflow_datasets
Variants ':384' and ':256-512', image folders and the paper's initialisation from net A:
see configs/base.py.

The paper's results on the ILSVRC-2012 validation set (top-1 / top-5 error, %):
  Table 3 (dense, one test scale): S=256 27.3 / 9.0; S=384 26.9 / 8.7;
    S in [256,512] (Q=384) 25.5 / 8.0.
  Table 4 (dense, three test scales): 26.9 / 8.7; 26.7 / 8.6; 24.8 / 7.5.
  Table 5 (S in [256,512], dense + multi-crop over three scales): 24.4 / 7.1.
"""

from configs import base


def get_config(train_scale: str = "256"):
    """Returns net E's recipe; `train_scale` as in `base.paper_config`."""
    return base.paper_config("E", train_scale)
