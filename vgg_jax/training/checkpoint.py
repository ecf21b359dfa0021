"""Training's checkpoints: orbax's manager holding everything a resume needs.

A step directory under `<workdir>/checkpoints/` holds the weights and their description
(params, batch_stats, meta: vgg_jax.weights.run_checkpoint, which also reads them back) and,
for training, two more items:

  train   optimiser state, step counter and RNG key;
  data    the grain iterator's position (one file per process), so the data stream resumes
          exactly where it stopped.

The meta item carries the rest of the run state (vgg_jax.training.run_state). Retention keeps
the newest `max_to_keep` checkpoints and the `keep_best` validated ones with the lowest
validation error; the newest is never deleted (orbax's `max_to_keep` with `best_fn` alone
can drop it and make a resume go back in time). A checkpoint saved between validations
carries no metrics, so "best" is always a validated step.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from vgg_jax.config_values import require
from vgg_jax.weights.run_checkpoint import (
    BATCH_STATS,
    CHECKPOINT_SUBDIR,
    META,
    PARAMS,
    ranking_metric,
    weight_handlers,
)

TRAIN, DATA = "train", "data"


def _item_handlers() -> dict[str, ocp.CheckpointHandler]:
    """The handler of each item of a training checkpoint (fresh objects: orbax ties each to
    one manager)."""
    return {**weight_handlers(), TRAIN: ocp.StandardCheckpointHandler(),
            DATA: grain.checkpoint.CheckpointHandler()}


def create_manager(
    path: str, *, max_to_keep: int = 3, keep_best: int = 1
) -> ocp.CheckpointManager:
    """Opens (or creates) the checkpoint manager of a training workdir.

    Args:
      path: the workdir; checkpoints live in its `checkpoints/` subdirectory.
      max_to_keep: how many of the newest checkpoints to keep.
      keep_best: how many checkpoints with the lowest `ranking_metric` to keep.

    Returns:
      An orbax CheckpointManager.
    """
    directory = os.path.join(os.path.abspath(os.path.expanduser(path)), CHECKPOINT_SUBDIR)
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=max_to_keep),
        checkpoint_managers.BestN(
            get_metric_fn=lambda metrics: -ranking_metric(metrics),
            n=keep_best,
            keep_checkpoints_without_metrics=False,
        ),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        # Saves run in a background thread; the step loop does not wait for the disk.
        enable_async_checkpointing=True,
    )
    return _TrainingCheckpointManager(directory, options=options,
                                      item_handlers=_item_handlers())


class _TrainingCheckpointManager(ocp.CheckpointManager):
    """orbax's manager, kept away from jax's preemption sync point.

    jax's sync manager remembers the step of the latest `reached_preemption_sync_point`
    call and, on a notice, sets the common stop step to the largest remembered step + 1,
    then answers True only at exactly that step. orbax calls it too, with the step being
    saved, also from its background finalize thread once the save is written, when the
    loop is a few steps further on: a notice arriving then would fix the stop step behind
    the loop, which never meets it again, and the preemption would be lost. The loop
    (`stop_signals.StopSignals`) is the only caller; it saves with force=True and needs
    none of orbax's preemption bookkeeping.
    """

    def reached_preemption(self, step: int) -> bool:
        del step
        return False


def save(
    manager: ocp.CheckpointManager,
    step: int,
    *,
    params: Any,
    batch_stats: Any | None = None,
    train: Any | None = None,
    data_iterator: Any | None = None,
    meta: Mapping[str, Any],
    metrics: Mapping[str, float] | None = None,
) -> None:
    """Starts an asynchronous save of one step (all processes must call it together).

    Args:
      manager: from `create_manager`.
      step: the step number, the directory name.
      params: parameters pytree.
      batch_stats: running batch-norm statistics; None or empty for nets without.
      train: optimiser state, step and RNG (omitted for weight files).
      data_iterator: the grain iterator whose position to save (omitted for weight files).
      meta: JSON-safe metadata; must hold "config".
      metrics: the metrics of this step's own validation, None for a step saved between
        validations; checkpoints with a `ranking_metric` compete for the best-checkpoint
        slots.
    """
    items = {PARAMS: ocp.args.StandardSave(params), META: ocp.args.JsonSave(dict(meta))}
    if batch_stats:
        items[BATCH_STATS] = ocp.args.StandardSave(batch_stats)
    if train is not None:
        items[TRAIN] = ocp.args.StandardSave(train)
    if data_iterator is not None:
        items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    manager.save(
        step,
        args=ocp.args.Composite(**items),
        metrics=dict(metrics) if metrics and ranking_metric(metrics) is not None else None,
        force=True,
    )


class RestoredTraining(NamedTuple):
    """What `restore_training` read; batch_stats is {} for nets without batch norm. (The
    step's metadata is read before, with `run_checkpoint.read_meta`.)"""

    params: Any
    train: Any
    batch_stats: Any


def restore_training(
    manager: ocp.CheckpointManager,
    step: int,
    *,
    params_target: Any,
    train_target: Any,
    data_iterator: Any,
    batch_stats_target: Any | None = None,
) -> RestoredTraining:
    """Restores everything a resume needs, with the shardings and dtypes of the targets.

    Args:
      manager: from `create_manager`.
      step: the step to restore.
      params_target: a pytree of arrays (or ShapeDtypeStructs) shaped like the params.
      train_target: the same for the train item.
      data_iterator: a fresh grain iterator; its position is restored in place.
      batch_stats_target: the same for the batch-norm statistics; None or empty for nets
        without batch norm.

    Returns:
      RestoredTraining(params, train, batch_stats).
    """
    abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    items = {
        PARAMS: ocp.args.StandardRestore(abstract(params_target)),
        TRAIN: ocp.args.StandardRestore(abstract(train_target)),
        DATA: grain.checkpoint.CheckpointRestore(data_iterator),
    }
    if batch_stats_target:
        items[BATCH_STATS] = ocp.args.StandardRestore(abstract(batch_stats_target))
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    return RestoredTraining(restored[PARAMS], restored[TRAIN],
                            restored[BATCH_STATS] if batch_stats_target else {})


def check_config(checkpoint_config: ml_collections.ConfigDict) -> None:
    """The rules of config.checkpoint (retention).

    Args:
      checkpoint_config: config.checkpoint.

    Raises:
      ConfigError: naming the field.
    """
    c = checkpoint_config
    require(c.max_to_keep >= 1,
            f"config.checkpoint.max_to_keep={c.max_to_keep} must be at least 1 (the newest "
            "checkpoint is what a resume needs).")
    require(c.keep_best >= 0, f"config.checkpoint.keep_best={c.keep_best} must be 0 or more.")
