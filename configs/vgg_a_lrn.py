"""ConvNet configuration A-LRN of the paper's Table 1: A with local response normalisation
(AlexNet's) after its first convolution.

  python main.py --config=configs/vgg_a_lrn.py --workdir=runs/vgg_a_lrn \
      --config.data.data_dir=/path/to/tensorflow_datasets
Variants ':384' and ':256-512', image folders and the paper's initialisation from net A:
see configs/base.py.

The paper's results on the ILSVRC-2012 validation set (top-1 / top-5 error, %):
  Table 3 (dense, one test scale): S=256 29.7 / 10.5 (LRN does not help).
"""

from configs import base


def get_config(train_scale: str = "256"):
    """Returns net A-LRN's recipe; `train_scale` as in `base.paper_config`."""
    return base.paper_config("A_LRN", train_scale)
