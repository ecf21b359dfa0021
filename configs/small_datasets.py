"""The paper's nets on the small TFDS data sets the original PyTorch project also trained on.

  python main.py --config=configs/small_datasets.py:cifar10 --workdir=runs/cifar10 \
      --config.data.data_dir=~/tensorflow_datasets
  (variants: cifar10, cifar100, mnist, caltech101)

The data sets are read with tfds.data_source (array_record). CIFAR, MNIST and Caltech-101
download and prepare themselves with TensorFlow installed, once:
  pip install -e ".[prepare]"
  python -m vgg_jax.data.prepare_tfds --name=cifar10 --data_dir=~/tensorflow_datasets

The recipe keeps the paper's optimiser, dropout, scale jittering and plateau schedule, and
shrinks what the smaller images require: 32x32 crops (the 28x28 digits of MNIST are
rescaled up to S), FC layers of 512 units for the 10/100-class sets. Results with this code
have not been measured yet.
"""

from configs import base
from vgg_jax.data import imagenet

# name: (version, num_classes, image_size, train S range, fc_features, mean RGB (0-255),
# horizontal flips, colour shift std, epochs, batch size). Mean RGB values are the
# training splits' published means.
_SETTINGS = {
    "cifar10": ("D", 10, 32, (32, 40), 512, (125.31, 122.95, 113.87), True, 0.1, 100, 128),
    "cifar100": ("D", 100, 32, (32, 40), 512, (129.30, 124.07, 112.43), True, 0.1, 100, 128),
    # A mirrored digit is another symbol; grey images have no colour to shift.
    "mnist": ("A", 10, 32, (32, 36), 512, (33.32, 33.32, 33.32), False, 0.0, 20, 128),
    # Photos of varying size, as ImageNet: the paper's crop size and full-width head.
    "caltech101": ("D", 102, 224, (256, 256), 4096, imagenet.MEAN_RGB, True, 0.1, 60, 64),
}


def get_config(name: str = "cifar10"):
    """Returns the recipe for one small data set.

    Args:
      name: "cifar10", "cifar100", "mnist" or "caltech101" (the part after the colon in
        --config=configs/small_datasets.py:NAME).

    Returns:
      The base recipe with that data set's settings from _SETTINGS.

    Raises:
      ValueError: for any other name.
    """
    if name not in _SETTINGS:
        raise ValueError(f"Unknown data set {name!r}; use one of {', '.join(_SETTINGS)}.")
    (version, num_classes, image_size, (s_min, s_max), fc, mean_rgb, flip, colour_std,
     epochs, batch) = _SETTINGS[name]
    config = base.get_config()
    config.model.version = version
    config.model.num_classes = num_classes
    config.model.fc_features = fc
    config.data.source = "tfds"
    config.data.name = name
    config.data.eval_split = "test"  # none of these sets has a validation split
    config.data.image_size = image_size
    config.data.train_scale_min, config.data.train_scale_max = s_min, s_max
    config.data.mean_rgb = mean_rgb
    config.data.random_flip = flip
    config.eval.flip = flip
    config.data.colour_shift_std = colour_std
    config.train.num_epochs = epochs
    config.train.batch_size = batch
    config.eval.batch_size = batch
    config.train.plateau_patience = 5
    config.train.log_every_steps = 50
    config.wandb.tags = (name,)
    return config
