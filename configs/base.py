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

    # --- The network (Table 1) ------------------------------------------------------------
    config.model = ml_collections.ConfigDict()
    config.model.version = "A"
    config.model.num_classes = 1000
    config.model.width_divisor = 1
    config.model.fc_features = 4096
    config.model.dropout_rate = 0.5
    # "glorot_uniform" (paper footnote; trains deep nets from scratch) or "normal" (the
    # paper's random init: zero mean, standard deviation normal_init_stddev).
    config.model.initializer = "glorot_uniform"
    # The paper says "variance 1e-2", literally a standard deviation of 0.1; with it each
    # 3x3 conv over 512 channels multiplies the signal by ~5 (0.1 * sqrt(9 * 512 / 2)), and
    # net A's initial logits reach ~6e8 at 224 pixels: it cannot train. 0.01 is the fixed
    # standard deviation later papers give for this initialisation (He et al. 2015, "Delving
    # deep into rectifiers", who also note that nets deeper than A do not converge with it,
    # hence the paper's start from net A). Pass 0.1 for the literal reading.
    config.model.normal_init_stddev = 0.01
    # Not the paper: a BatchNorm after every convolution, before its ReLU (torchvision's
    # vgg11_bn ... vgg19_bn layout, for any version). Running statistics are checkpointed
    # and used by evaluation.
    config.model.batch_norm = False
    # "auto": bfloat16 on GPU/TPU, float32 on CPU. Parameters are always float32.
    config.model.compute_dtype = "auto"
    # "" = a classifier; "per_class" or "single_class" = a box net of the paper's Appendix A
    # (fc8 regresses 4 numbers per class, PCR, or 4 shared by all, SCR): the localisation
    # task, whose settings are configs/localisation.py's `localisation` section.
    config.model.box_regression = ""

    # --- Data (3.1 training, 3.2 testing) -------------------------------------------------
    config.data = ml_collections.ConfigDict()
    # "tfds": a prepared TFDS data set (array_record) named `name` under `data_dir`.
    # "folder": `data_dir`/train/<class>/<image> and `data_dir`/val/<class>/<image>.
    # "digits": scikit-learn's handwritten digits, written once as such a folder.
    config.data.source = "tfds"
    config.data.name = "imagenet2012"
    config.data.data_dir = ml_collections.config_dict.placeholder(str)
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    # Crop side fed to the net (224 in the paper).
    config.data.image_size = 224
    # Training scale S: the shortest side after isotropic rescaling, drawn uniformly per
    # image from [train_scale_min, train_scale_max] (equal bounds: single-scale training).
    config.data.train_scale_min = 256
    config.data.train_scale_max = 256
    # The test scale Q follows from S as in the paper (3.2): Q = S, or the middle of a
    # jittered range (vgg_jax.data.transforms.single_test_scale); validation during
    # training uses it, and --mode=eval too unless config.eval.scales says otherwise.
    config.data.random_flip = True
    # Standard deviation of AlexNet's PCA colour shift; 0 disables it.
    config.data.colour_shift_std = 0.1
    config.data.pca_eigenvalues = imagenet.PCA_EIGENVALUES
    config.data.pca_eigenvectors = imagenet.PCA_EIGENVECTORS
    config.data.mean_rgb = imagenet.MEAN_RGB
    # Per-channel divisor applied after mean subtraction (1 = the paper; imported
    # torchvision weights need ImageNet's standard deviation, 0-255 scale).
    config.data.std_rgb = (1.0, 1.0, 1.0)
    # Source "digits": each 8x8 digit is upscaled to digits_image_size and written as a
    # JPEG of this quality.
    config.data.digits_image_size = 32
    config.data.jpeg_quality = 95
    # Fraction of the digits held out as the validation split, and the seed of that split.
    config.data.val_fraction = 0.2
    config.data.split_seed = 0
    # grain: worker processes decoding images (0 = in the main process) and prefetching.
    config.data.num_workers = 8
    config.data.prefetch_buffer_size = 2
    # Batches transferred to the devices ahead of the step by a background thread, so the
    # step never waits for its batch (0 = fetch and transfer each batch in the loop).
    config.data.device_prefetch = 2
    # Where source "digits" writes its image folder (~ is expanded).
    config.data.cache_dir = "~/.cache/vgg_jax"

    # --- Optimisation (3.1) ---------------------------------------------------------------
    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 256  # global, over all devices of all hosts
    config.train.num_epochs = 74
    config.train.learning_rate = 1e-2
    config.train.momentum = 0.9
    config.train.weight_decay = 5e-4
    config.train.decay_biases = True
    # Gradient accumulation: each optimiser step averages this many micro-batches of
    # batch_size / grad_accum_steps images (the original project ran 64 x 4).
    config.train.grad_accum_steps = 1
    # Fine-tuning: layers whose parameters stay fixed, as names or shell patterns
    # ("conv*" = the whole trunk, "conv1_*", "fc6"); a frozen conv's batch norm keeps its
    # running statistics. Optimiser updates are zero for them (optax.multi_transform).
    config.train.frozen_layers = ()
    # Global-norm gradient clipping; 0 disables it.
    config.train.grad_clip_norm = 0.0
    # Learning-rate plateau schedule (the paper cut the rate by 10 when validation accuracy
    # stopped improving, 3 times): multiply by `plateau_factor` when the monitored metric
    # has not improved by a relative `plateau_threshold` for `plateau_patience` evaluations
    # in a row, at most `plateau_max_reductions` times; stop when it stalls after the last cut.
    config.train.plateau_factor = 0.1
    config.train.plateau_patience = 2
    config.train.plateau_threshold = 1e-3
    config.train.plateau_max_reductions = 3
    config.train.plateau_monitor = "val/top1_error"
    # Cadences, in optimiser steps (one step = batch_size images, whatever grad_accum_steps).
    config.train.log_every_steps = 100
    config.train.eval_every_epochs = 1
    config.train.checkpoint_every_steps = 2000
    # Device profile: trace `profile_num_steps` steps from step `profile_first_step` into
    # <workdir>/profile (jax.profiler; view with xprof or TensorBoard's profile plugin).
    # -1 = no profile. Start after compilation and warm-up, e.g. 100.
    config.train.profile_first_step = -1
    config.train.profile_num_steps = 5

    # --- Checkpoints ----------------------------------------------------------------------
    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.max_to_keep = 3
    config.checkpoint.keep_best = 1
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

    # --- Logging --------------------------------------------------------------------------
    config.wandb = ml_collections.ConfigDict()
    # "online", "offline" or "disabled"; "auto" = online when logged in, else offline.
    config.wandb.mode = "auto"
    config.wandb.project = "vgg-jax"
    config.wandb.name = ""
    config.wandb.tags = ()
    config.progress_bar = True

    # --- Evaluation (3.2) -----------------------------------------------------------------
    config.eval = ml_collections.ConfigDict()
    # "single_crop", "dense", "multi_crop" or "dense+multi_crop". Dense is the protocol of
    # the paper's Tables 3 and 4 (single- and multi-scale test); Table 5 compares the rest.
    config.eval.protocol = "dense"
    # Test scales Q; () = Q equal to S (fixed S) or 384 (jittered S), as in the paper.
    config.eval.scales = ()
    # Side of the grid of crops per scale in multi-crop evaluation (5 x 5 x 2 flips = 50).
    config.eval.multi_crop_grid = 5
    # Other workdirs whose nets are averaged with this one at the softmax.
    config.eval.ensemble = ()
    # With `scales` empty: the paper's multi-scale set instead of the single scale, i.e.
    # {S-32, S, S+32} for fixed S and {256, 384, 512} for jittered S in [256, 512].
    config.eval.multi_scale = False
    # Average each view with its horizontal flip in dense and multi-crop evaluation (3.2).
    config.eval.flip = True
    # Per global batch, the number of image_size x image_size net inputs, in training's
    # validation (one per image) and in every protocol here (a multi-crop image counts
    # 2 * grid^2, a dense image 2 x its area in crops): bounds memory alike everywhere.
    config.eval.batch_size = 256
    # Dense evaluation crops each rescaled image to multiples of this many pixels, so the
    # images fall into a bounded number of shapes (one compilation each).
    config.eval.dense_size_step = 32
    return config


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
