"""The paper's ImageNet recipe (Simonyan & Zisserman 2015, section 3): every hyperparameter,
cadence and constant of training and evaluation lives here, and each net's config changes
only what the paper changes.

Not a runnable config on its own: use configs/vgg_a.py ... configs/vgg_e.py, e.g.

  python main.py --config=configs/vgg_d.py --workdir=runs/vgg_d \
      --config.data.data_dir=/path/to/tensorflow_datasets          # a TFDS imagenet2012 build
  python main.py --config=configs/vgg_d.py --workdir=runs/vgg_d \
      --config.data.source=folder --config.data.data_dir=/path/to/imagenet  # train/, val/

A ':384' or ':256-512' suffix selects the paper's other training scales (`set_train_scale`).
The paper initialised B-E from a trained net A (its first four conv layers and its three FC
layers); Glorot initialisation, the default here, trains them from scratch as well. To
follow the paper, add --config.init_from=runs/vgg_a (those layers are the default choice
from net A into a deeper net).
Each net's file lists the paper's results for it (vgg_jax/evaluation/paper.py holds them all).
"""

import ml_collections

from vgg_jax.data import imagenet


def get_config() -> ml_collections.ConfigDict:
    """Returns the shared recipe; net configs override `model.version` and friends.

    Returns:
      A new ConfigDict of the paper's ImageNet recipe (net A, S = Q = 256).
    """
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = _model()
    config.data = _data()
    config.train = _train()
    config.checkpoint = _checkpoint()
    _starting_point(config)
    config.wandb = _wandb()
    config.progress_bar = True
    config.eval = _eval()
    return config


def _model() -> ml_collections.ConfigDict:
    """The network (Table 1)."""
    c = ml_collections.ConfigDict()
    c.version = "A"
    c.num_classes = 1000
    c.width_divisor = 1
    c.fc_features = 4096
    c.dropout_rate = 0.5
    # "glorot_uniform" (paper footnote; trains deep nets from scratch) or "normal" (the
    # paper's random init: zero mean, standard deviation normal_init_stddev).
    c.initializer = "glorot_uniform"
    # The paper says "variance 1e-2", literally a standard deviation of 0.1; with it each
    # 3x3 conv over 512 channels multiplies the signal by ~5 (0.1 * sqrt(9 * 512 / 2)), and
    # net A's initial logits reach ~6e8 at 224 pixels: it cannot train. 0.01 is the fixed
    # standard deviation later papers give for this initialisation (He et al. 2015, "Delving
    # deep into rectifiers", who also note that nets deeper than A do not converge with it,
    # hence the paper's start from net A). Pass 0.1 for the literal reading.
    c.normal_init_stddev = 0.01
    # Not the paper: a BatchNorm after every convolution, before its ReLU (torchvision's
    # vgg11_bn ... vgg19_bn layout, for any version). Running statistics are checkpointed
    # and used by evaluation.
    c.batch_norm = False
    # "auto": bfloat16 on GPU/TPU, float32 on CPU. Parameters are always float32.
    c.compute_dtype = "auto"
    # "" = a classifier; "per_class" or "single_class" = a box net of the paper's Appendix A
    # (fc8 regresses 4 numbers per class, PCR, or 4 shared by all, SCR): the localisation
    # task, whose settings are configs/localisation.py's `localisation` section.
    c.box_regression = ""
    return c


def _data() -> ml_collections.ConfigDict:
    """Data: the training augmentation (3.1) and the test scale it implies (3.2)."""
    c = ml_collections.ConfigDict()
    # "tfds": a prepared TFDS data set (array_record) named `name` under `data_dir`.
    # "folder": `data_dir`/train/<class>/<image> and `data_dir`/val/<class>/<image>.
    # "digits": scikit-learn's handwritten digits, written once as such a folder.
    c.source = "tfds"
    c.name = "imagenet2012"
    c.data_dir = ml_collections.config_dict.placeholder(str)
    c.train_split = "train"
    c.eval_split = "validation"
    # Crop side fed to the net (224 in the paper).
    c.image_size = 224
    # Training scale S: the shortest side after isotropic rescaling, drawn uniformly per
    # image from [train_scale_min, train_scale_max] (equal bounds: single-scale training).
    c.train_scale_min = 256
    c.train_scale_max = 256
    # The test scale Q follows from S as in the paper (3.2): Q = S, or the middle of a
    # jittered range (vgg_jax.data.transforms.single_test_scale); validation during
    # training uses it, and --mode=eval too unless config.eval.scales says otherwise.
    c.random_flip = True
    # Standard deviation of AlexNet's PCA colour shift; 0 disables it.
    c.colour_shift_std = 0.1
    c.pca_eigenvalues = imagenet.PCA_EIGENVALUES
    c.pca_eigenvectors = imagenet.PCA_EIGENVECTORS
    c.mean_rgb = imagenet.MEAN_RGB
    # Per-channel divisor applied after mean subtraction (1 = the paper; imported
    # torchvision weights need ImageNet's standard deviation, 0-255 scale).
    c.std_rgb = (1.0, 1.0, 1.0)
    # Source "digits": each 8x8 digit is upscaled to digits_image_size and written as a
    # JPEG of this quality.
    c.digits_image_size = 32
    c.jpeg_quality = 95
    # Fraction of the digits held out as the validation split, and the seed of that split.
    c.val_fraction = 0.2
    c.split_seed = 0
    # grain: worker processes decoding images (0 = in the main process) and prefetching.
    c.num_workers = 8
    c.prefetch_buffer_size = 2
    # Batches transferred to the devices ahead of the step by a background thread, so the
    # step never waits for its batch (0 = fetch and transfer each batch in the loop).
    c.device_prefetch = 2
    # Where source "digits" writes its image folder (~ is expanded).
    c.cache_dir = "~/.cache/vgg_jax"
    return c


def _train() -> ml_collections.ConfigDict:
    """Optimisation (3.1): SGD, the plateau schedule, cadences."""
    c = ml_collections.ConfigDict()
    c.batch_size = 256  # global, over all devices of all hosts
    c.num_epochs = 74
    c.learning_rate = 1e-2
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.decay_biases = True
    # Gradient accumulation: each optimiser step averages this many micro-batches of
    # batch_size / grad_accum_steps images (the original project ran 64 x 4).
    c.grad_accum_steps = 1
    # Fine-tuning: layers whose parameters stay fixed, as names or shell patterns
    # ("conv*" = the whole trunk, "conv1_*", "fc6"); a frozen conv's batch norm keeps its
    # running statistics. Optimiser updates are zero for them (optax.multi_transform).
    c.frozen_layers = ()
    # Global-norm gradient clipping; 0 disables it.
    c.grad_clip_norm = 0.0
    # Learning-rate plateau schedule (the paper cut the rate by 10 when validation accuracy
    # stopped improving, 3 times): multiply by `plateau_factor` when the monitored metric
    # has not improved by a relative `plateau_threshold` for `plateau_patience` evaluations
    # in a row, at most `plateau_max_reductions` times; stop when it stalls after the last cut.
    c.plateau_factor = 0.1
    c.plateau_patience = 2
    c.plateau_threshold = 1e-3
    c.plateau_max_reductions = 3
    c.plateau_monitor = "val/top1_error"
    # Cadences, in optimiser steps (one step = batch_size images, whatever grad_accum_steps).
    c.log_every_steps = 100
    c.eval_every_epochs = 1
    c.checkpoint_every_steps = 2000
    # Device profile: trace `profile_num_steps` steps from step `profile_first_step` into
    # <workdir>/profile (jax.profiler; view with xprof or TensorBoard's profile plugin).
    # -1 = no profile. Start after compilation and warm-up, e.g. 100.
    c.profile_first_step = -1
    c.profile_num_steps = 5
    return c


def _checkpoint() -> ml_collections.ConfigDict:
    """Checkpoint retention."""
    c = ml_collections.ConfigDict()
    c.max_to_keep = 3
    c.keep_best = 1
    return c


def _starting_point(config: ml_collections.ConfigDict) -> None:
    """Where training starts: from scratch, or from another run's checkpoint."""
    # Initialise from another run's checkpoint (a workdir, or torchvision weights
    # converted with python -m vgg_jax.convert); "" = none. Its preprocessing (mean_rgb,
    # std_rgb) is inherited unless given on the command line. The layers copied: () = from
    # net A into a deeper net, the paper's choice (A's first four conv layers and the
    # three FC layers: "conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6", "fc7", "fc8");
    # otherwise every layer both nets share with equal shapes (the same net at another
    # scale, or a new head for other classes). Every layer not copied is logged with why.
    config.init_from = ""
    config.init_from_layers = ()
    # True for the paper's fine-tuning stages (the ':384' and ':256-512' variants, at a
    # learning rate of 1e-3): training then needs config.init_from, or this set to False to
    # train at those settings from scratch (which costs several points of error).
    config.init_from_required = False


def _wandb() -> ml_collections.ConfigDict:
    """Weights & Biases logging."""
    c = ml_collections.ConfigDict()
    # "online", "offline" or "disabled"; "auto" = online when logged in, else offline.
    c.mode = "auto"
    c.project = "vgg-jax"
    c.name = ""
    c.tags = ()
    return c


def _eval() -> ml_collections.ConfigDict:
    """Evaluation (3.2): the protocols and their batches."""
    c = ml_collections.ConfigDict()
    # "single_crop", "dense", "multi_crop" or "dense+multi_crop". Dense is the protocol of
    # the paper's Tables 3 and 4 (single- and multi-scale test); Table 5 compares the rest.
    c.protocol = "dense"
    # Test scales Q; () = Q equal to S (fixed S) or 384 (jittered S), as in the paper.
    c.scales = ()
    # Side of the grid of crops per scale in multi-crop evaluation (5 x 5 x 2 flips = 50).
    c.multi_crop_grid = 5
    # Other workdirs whose nets are averaged with this one at the softmax.
    c.ensemble = ()
    # With `scales` empty: the paper's multi-scale set instead of the single scale, i.e.
    # {S-32, S, S+32} for fixed S and {256, 384, 512} for jittered S in [256, 512].
    c.multi_scale = False
    # Average each view with its horizontal flip in dense and multi-crop evaluation (3.2).
    c.flip = True
    # Per global batch, the number of image_size x image_size net inputs, in training's
    # validation (one per image) and in every protocol here (a multi-crop image counts
    # 2 * grid^2, a dense image 2 x its area in crops): bounds memory alike everywhere.
    c.batch_size = 256
    # Dense evaluation crops each rescaled image to multiples of this many pixels, so the
    # images fall into a bounded number of shapes (one compilation each).
    c.dense_size_step = 32
    return c


def set_train_scale(config: ml_collections.ConfigDict, scale: str) -> ml_collections.ConfigDict:
    """Applies one of the paper's training-scale settings (3.1) to a config.

    Args:
      config: a config from `get_config`.
      scale: "256" or "384" (single-scale S) or "256-512" (scale jittering,
        S uniform in [256, 512]). The paper trained S=384 from the S=256 net with a
        learning rate of 1e-3, and the jittered nets from the S=384 net: pass the
        starting checkpoint as --config.init_from (config.init_from_required says so).

    Returns:
      The same config, changed in place.

    Raises:
      ValueError: for any other scale.
    """
    if scale == "256":
        return config
    if scale == "384":
        config.data.train_scale_min = config.data.train_scale_max = 384
        config.train.learning_rate = 1e-3
        config.init_from_required = True
        return config
    if scale == "256-512":
        config.data.train_scale_min, config.data.train_scale_max = 256, 512
        # The paper gives no rate for this fine-tuning from the S=384 net; we keep that
        # net's 1e-3 (an assumption, like the plateau schedule and epoch budget here).
        config.train.learning_rate = 1e-3
        config.init_from_required = True
        return config
    raise ValueError(f"Unknown training scale {scale!r}; use '256', '384' or '256-512'.")


def paper_config(version: str, train_scale: str = "256") -> ml_collections.ConfigDict:
    """The recipe for one of the paper's nets at one of its training scales.

    Args:
      version: "A", "A_LRN", "B", "C", "D" or "E".
      train_scale: "256", "384" or "256-512" (see `set_train_scale`).

    Returns:
      The base recipe with model.version and the training scale set.
    """
    config = set_train_scale(get_config(), train_scale)
    config.model.version = version
    return config
