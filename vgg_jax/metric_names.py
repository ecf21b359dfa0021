"""Names of the logged metrics, shared by the training loop, checkpoints, writers and plots.

The names follow the original PyTorch project's, with a split prefix; every record's x-axis
is the optimiser step.
"""

TRAIN_LOSS = "train/loss"
TRAIN_TOP1_ERROR = "train/top1_error"
TRAIN_TOP5_ERROR = "train/top5_error"
TRAIN_IMAGES_PER_SEC = "train/images_per_sec"
TRAIN_GRAD_NORM = "train/grad_norm"
TRAIN_SKIPPED_IMAGES = "train/skipped_images"
VAL_LOSS = "val/loss"
VAL_TOP1_ERROR = "val/top1_error"
VAL_TOP5_ERROR = "val/top5_error"
VAL_COUNT = "val/count"
# Localisation (Appendix A): the share of crops (training) or images (validation, protocol
# 1) whose box has IoU < 0.5 with the ground truth, and the training crops dropped for
# losing their object.
TRAIN_LOC_ERROR = "train/loc_error"
TRAIN_DROPPED_CROPS = "train/dropped_crops"
VAL_LOC_ERROR = "val/loc_error"
LEARNING_RATE = "lr"
EPOCH = "epoch"
# The x-axis key of every record (JSON lines) and of every wandb chart.
STEP = "step"

# The validation metrics the plateau schedule may watch (all to be minimised).
MONITORABLE = (VAL_TOP1_ERROR, VAL_TOP5_ERROR, VAL_LOSS, VAL_LOC_ERROR)
# The metric that ranks a run's checkpoints (lower is better): the first of these that its
# validation reports (a classifier's top-1 error, a box net's localisation error).
RANKING = (VAL_TOP1_ERROR, VAL_LOC_ERROR)
