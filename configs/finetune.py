"""Fine-tuning a trained or converted net on your own images (an image folder, any classes).

The net (version, width, FC size, batch norm, crop size and scales) and its preprocessing
(mean and std) come from the checkpoint in --config.init_from; the class count comes from
the data. Every layer of equal shape is copied, so with other classes the head (fc8)
starts fresh; the log names each layer copied and each skipped with why.

  python main.py --config=configs/finetune.py --workdir=runs/flowers \
      --config.init_from=vgg16 \
      --config.data.data_dir=/path/to/flowers          # train/<class>/*, val/<class>/*
  # init_from takes any weights (docs/weights.md): vgg16 is torchvision's ImageNet VGG-16
  # from the hub; also a .safetensors/.pth/.npz/.caffemodel file or a run's DIR[@STEP].
  # only the head and fc6/fc7 learn; the conv trunk (and its batch norms) stays fixed:
      --config.train.frozen_layers="conv*"

Frozen layers get zero updates (optax.multi_transform with set_to_zero: no weight decay,
no momentum buffers), and a frozen conv's batch norm keeps normalising with the running
statistics it was trained with. Any field of the recipe below can be overridden as usual.
"""

from ml_collections import config_dict

from configs import base


def get_config():
    """Returns the fine-tuning recipe.

    Returns:
      The base recipe on an image folder, the net left to config.init_from (None fields),
      a tenth of the paper's learning rate and a short schedule.
    """
    config = base.get_config()
    # None: taken from the checkpoint in init_from (vgg_jax.training.warm_start.resolve_config).
    config.init_from = config_dict.placeholder(str)
    config.model.version = config_dict.placeholder(str)
    config.model.width_divisor = config_dict.placeholder(int)
    config.model.fc_features = config_dict.placeholder(int)
    config.model.batch_norm = config_dict.placeholder(bool)
    # None: the data set's number of classes.
    config.model.num_classes = config_dict.placeholder(int)
    config.data.image_size = config_dict.placeholder(int)
    config.data.train_scale_min = config_dict.placeholder(int)
    config.data.train_scale_max = config_dict.placeholder(int)

    config.data.source = "folder"
    config.data.num_workers = 4
    # Pretrained layers need small steps (the paper fine-tuned its nets at 1e-3).
    config.train.learning_rate = 1e-3
    config.train.num_epochs = 20
    config.train.batch_size = 64
    config.eval.batch_size = 64
    config.train.plateau_patience = 3
    config.train.log_every_steps = 20
    # Single-crop validation at the source's test scale; --mode=eval offers the rest.
    config.eval.protocol = "single_crop"
    config.wandb.tags = ("finetune",)
    return config
