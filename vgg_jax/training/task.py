"""The task switch: what the training loop does differently for a classifier and a box net.

A classifier (the paper's section 3) and a box net (Appendix A, localisation; selected by
config.model.box_regression) share the loop, its checkpoints, resume, plateau rule and
writers. A `Task` holds what differs: the training records and their per-crop transform,
the loss sums of the train step, the training metrics logged from those sums, and the
last validation in words. (The validation itself is chosen in `loop.validation_fn`.)
The localisation pieces live in vgg_jax.localisation.training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections

from vgg_jax import metric_names as names
from vgg_jax.config_values import require
from vgg_jax.data import sources, transforms
from vgg_jax.evaluation.metrics import summarize
from vgg_jax.localisation import training as localisation_training
from vgg_jax.models import is_box_regressor
from vgg_jax.training.step import StepSums, classification_step_sums


@dataclasses.dataclass(frozen=True)
class Task:
    """What the loop takes from its task.

    Attributes:
      name: "classification" or "localisation".
      train_source: the training records (random access).
      train_transform: the per-crop augmentation (a `transforms.TrainAugmentation`).
      step_sums: the train step's loss and metric sums (`step.StepSums`).
      train_metrics: the steps' sums since the last log (host values) -> the logged
        training metrics (the loop adds images/s, gradient norm and skipped images).
      describe: the last validation's metrics -> a phrase for the run's last line.
    """

    name: str
    train_source: Any
    train_transform: transforms.TrainAugmentation
    step_sums: StepSums
    train_metrics: Callable[[Sequence[Mapping[str, Any]]], dict[str, float]]
    describe: Callable[[Mapping[str, float]], str]


def check_config(config: ml_collections.ConfigDict) -> None:
    """The task's own rules: a box net's localisation section, and a classifier's monitor.

    Args:
      config: the run config.

    Raises:
      ConfigError: one sentence naming the first bad field and the fix.
    """
    if is_box_regressor(config):
        localisation_training.check_config(config)
        return
    require(config.train.plateau_monitor != names.VAL_LOC_ERROR,
            f"config.train.plateau_monitor={names.VAL_LOC_ERROR!r} is a box net's metric; a "
            "classifier's validation reports val/top1_error, val/top5_error and val/loss.")


def classification_train_metrics(host_sums: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """A classifier's logged training metrics: mean loss, top-1 and top-5 error."""
    summary = summarize(host_sums)
    return {names.TRAIN_LOSS: summary["loss"], names.TRAIN_TOP1_ERROR: summary["top1_error"],
            names.TRAIN_TOP5_ERROR: summary["top5_error"]}


def describe_classification(metrics: Mapping[str, float]) -> str:
    """A classifier's validation in words: top-1 (with accuracy) and top-5 error."""
    top1, top5 = metrics[names.VAL_TOP1_ERROR], metrics[names.VAL_TOP5_ERROR]
    return (f"top-1 error {100 * top1:.2f}% (accuracy {100 * (1 - top1):.2f}%), top-5 error "
            f"{100 * top5:.2f}%")


def for_config(config: ml_collections.ConfigDict) -> Task:
    """The task of a run config (opens its training records).

    Args:
      config: a validated run config.

    Returns:
      Localisation's Task for a box net (config.model.box_regression set), else
      classification's.
    """
    if is_box_regressor(config):
        return Task(name="localisation", **localisation_training.task_parts(config))
    return Task(
        name="classification",
        train_source=sources.make_source(config.data, str(config.data.train_split)),
        train_transform=transforms.TrainAugmentation(config.data),
        step_sums=classification_step_sums, train_metrics=classification_train_metrics,
        describe=describe_classification)


def validation_fn(model: Any, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                  ) -> Callable[[Any], dict[str, float]] | None:
    """A box net's validation (protocol 1), or None: the loop's own (classification's).

    Args:
      model, config, mesh: as `loop.validation_fn`.
    """
    if is_box_regressor(config):
        return localisation_training.validation_fn(model, config, mesh)
    return None
