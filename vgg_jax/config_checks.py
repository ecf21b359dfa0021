"""Checks a run config before any work, so a mistake costs seconds, not a crashed job.

Each component owns the rules of its config section, beside the values it interprets
(`models.check_config`, `data.pipeline.check_config`, `optim.check_config`, ...);
`validate_config` only calls them, in the order of the config, and adds the one check
that reads files: that the data set exists and has the net's class count. Every failure
is one sentence that names the field and how to fix it.
"""

from __future__ import annotations

import ml_collections

from vgg_jax import preprocess
from vgg_jax.config_values import ConfigError, require
from vgg_jax.data import pipeline, sources
from vgg_jax.evaluation import protocols
from vgg_jax.localisation import training as localisation_training
from vgg_jax.models import check_config as check_model_config
from vgg_jax.models import check_frozen_layers
from vgg_jax.training import checkpoint, loop, optim, task, writers

__all__ = ["ConfigError", "renamed_field_message", "validate_config"]

# Fields that were renamed: old path -> the new field and its unit, for the one-sentence
# error that an old command line or config file gets.
RENAMED_FIELDS = {
    "train.eval_batch_size": "config.eval.batch_size (net inputs of image_size^2 per global "
                             "batch; one per image in training's single-crop validation)",
}


def validate_config(
    config: ml_collections.ConfigDict, *, device_count: int | None = None,
    process_count: int = 1, check_data: bool = True,
) -> None:
    """Raises ConfigError for the first field that cannot work.

    Args:
      config: the full run config.
      device_count: devices over all processes (the batch is split over them); None
        leaves `loop.check_batch_split` for later (main.py runs it once jax.distributed has
        joined the processes, which it need not wait for to find other mistakes).
      process_count: number of processes (each reads its share of every batch).
      check_data: also check that the data set exists (cheap; no image is decoded).

    Raises:
      ConfigError: with one sentence naming the field and the fix.
    """
    for old in RENAMED_FIELDS:
        section, field = old.split(".")
        require(field not in config.get(section, {}), renamed_field_message(old))
    check_model_config(config.model, config.data.image_size)
    check_frozen_layers(config.train.get("frozen_layers", ()), config.model.version)
    pipeline.check_config(config.data)
    preprocess.check_config(config.data)
    loop.check_config(config.train)
    if device_count is not None:
        loop.check_batch_split(config.train, device_count, process_count)
    optim.check_config(config.train)
    checkpoint.check_config(config.checkpoint)
    writers.check_config(config.wandb)
    protocols.check_config(config.eval, config.data.image_size)
    task.check_config(config)  # classification or localisation (config.model.box_regression)
    if check_data:  # a training run
        _check_starting_point(config)
        localisation_training.check_data(config)  # canvases written, box files found
        _check_data_set(config)


def renamed_field_message(field: str) -> str | None:
    """The sentence for an old field name ("eval_batch_size" or "train.eval_batch_size").

    Args:
      field: a field path or its last part.

    Returns:
      The sentence naming the new field, or None when `field` was not renamed.
    """
    for old, new in RENAMED_FIELDS.items():
        if field in (old, old.rsplit(".", 1)[-1]):
            return f"config.{old} is now {new}; set that instead."
    return None


def _check_starting_point(config: ml_collections.ConfigDict) -> None:
    """A fine-tuning stage (config.init_from_required, set by the ':384' and ':256-512'
    variants) starts from a trained net, or is told explicitly to train from scratch."""
    require(not config.get("init_from_required", False) or bool(config.init_from),
            "This config is one of the paper's fine-tuning stages (config.init_from_required="
            "True: S=384 starts from the trained S=256 net, S in [256,512] from the S=384 "
            "one, at learning rate 1e-3), so pass the run it continues as "
            "--config.init_from=<workdir>, or --config.init_from_required=False to train it "
            "from scratch.")


def _check_data_set(config: ml_collections.ConfigDict) -> None:
    """The data set can be read and has as many classes as the net has outputs."""
    try:
        sources.validate_source(config.data)
        data_classes = sources.num_classes(config.data)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    num_classes = config.model.num_classes
    require(data_classes == num_classes,
            f"config.model.num_classes={num_classes} but the data set has {data_classes} "
            f"classes; pass --config.model.num_classes={data_classes}.")
