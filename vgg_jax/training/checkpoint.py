"""Checkpoints: orbax CheckpointManager holding everything a resume needs.

A checkpoint is a step directory under `<workdir>/checkpoints/` with up to five items:

  params       the network parameters (with batch_stats, all that evaluation, prediction
               and transfer read);
  batch_stats  the running batch-norm statistics, for nets with batch norm only;
  train   optimiser state, step counter and RNG key;
  data    the grain iterator's position (one file per process), so the data stream resumes
          exactly where it stopped;
  meta    JSON: the run's config, the epoch, the rest of the run state
          (vgg_jax.training.run_state), and, on a step that was validated, its validation's
          metrics ("validation").

Weight files converted from other frameworks hold only `params` and `meta`, and load the
same way. Retention keeps the newest `max_to_keep` checkpoints and the `keep_best`
validated ones with the lowest validation top-1 error (a box net's: localisation error); the
newest is never deleted (orbax's `max_to_keep` with `best_fn` alone can drop it and make a
resume go back in time). "best" is always a validated step: a checkpoint saved between
validations carries no metrics.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers

from vgg_jax.config_values import require
from vgg_jax.training import metric_names

CHECKPOINT_SUBDIR = "checkpoints"

PARAMS, BATCH_STATS, TRAIN, DATA, META = "params", "batch_stats", "train", "data", "meta"
# The meta entry holding the metrics of the step's own validation (validated steps only).
VALIDATION = "validation"


def ranking_metric(metrics: Mapping[str, Any]) -> float | None:
    """The value that ranks a checkpoint (lower is better): its validation's top-1 error,
    or a box net's localisation error (metric_names.RANKING); None when it has neither."""
    for name in metric_names.RANKING:
        if name in metrics:
            return float(metrics[name])
    return None


def checkpoint_dir(path: str) -> str:
    """The directory of step checkpoints for a workdir (or that directory itself)."""
    path = os.path.abspath(os.path.expanduser(path))
    sub = os.path.join(path, CHECKPOINT_SUBDIR)
    return sub if os.path.isdir(sub) else path


def _item_handlers(training: bool = True) -> dict[str, ocp.CheckpointHandler]:
    """The handler of each checkpoint item: the variables and metadata, and with
    `training` the optimiser state and the data iterator's position too (fresh handler
    objects: orbax ties each to one manager)."""
    handlers = {
        PARAMS: ocp.StandardCheckpointHandler(),
        BATCH_STATS: ocp.StandardCheckpointHandler(),
        META: ocp.JsonCheckpointHandler(),
    }
    if training:
        # Imported here so that reading parameters (evaluation, conversion) never needs grain.
        import grain

        handlers |= {TRAIN: ocp.StandardCheckpointHandler(),
                     DATA: grain.checkpoint.CheckpointHandler()}
    return handlers


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


def config_to_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A JSON-safe dict of a config (tuples become lists)."""
    return json.loads(config.to_json_best_effort())


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
        import grain

        items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    manager.save(
        step,
        args=ocp.args.Composite(**items),
        metrics=dict(metrics) if metrics and ranking_metric(metrics) is not None else None,
        force=True,
    )


class RestoredTraining(NamedTuple):
    """What `restore_training` read; batch_stats is {} for nets without batch norm."""

    params: Any
    train: Any
    meta: dict[str, Any]
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
      RestoredTraining(params, train, meta, batch_stats).
    """
    import grain

    abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    items = {
        PARAMS: ocp.args.StandardRestore(abstract(params_target)),
        TRAIN: ocp.args.StandardRestore(abstract(train_target)),
        DATA: grain.checkpoint.CheckpointRestore(data_iterator),
        META: ocp.args.JsonRestore(),
    }
    if batch_stats_target:
        items[BATCH_STATS] = ocp.args.StandardRestore(abstract(batch_stats_target))
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    return RestoredTraining(restored[PARAMS], restored[TRAIN], restored[META],
                            restored[BATCH_STATS] if batch_stats_target else {})


# Written last by orbax when a step's save is complete.
COMPLETE_MARKER = "_CHECKPOINT_METADATA"


def complete_steps(manager: ocp.CheckpointManager) -> list[int]:
    """The steps whose save finished, in increasing order.

    A save killed midway normally leaves a temporary directory that orbax ignores, but a
    step-named directory without orbax's completion marker (e.g. a copy that was cut
    short) would be counted by orbax and fail to restore; such directories are skipped.

    Args:
      manager: the run's checkpoint manager.

    Returns:
      Sorted step numbers.
    """
    steps = []
    for step in sorted(manager.all_steps()):
        if os.path.exists(os.path.join(str(manager.directory), str(step), COMPLETE_MARKER)):
            steps.append(step)
        else:
            logging.warning("Ignoring incomplete checkpoint directory %s/%d.",
                            manager.directory, step)
    return steps


def latest_complete_step(manager: ocp.CheckpointManager) -> int | None:
    """The newest step whose save finished, or None.

    Args:
      manager: the run's checkpoint manager.

    Returns:
      A step number, or None when no save finished.
    """
    steps = complete_steps(manager)
    return steps[-1] if steps else None


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """Reads the JSON metadata of one step.

    Args:
      manager: the run's checkpoint manager.
      step: a complete step.

    Returns:
      The metadata dict ("config", "epoch", "run", and "validation" on a validated step).
    """
    restored = manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
    return restored[META]


def best_step(manager: ocp.CheckpointManager) -> int | None:
    """The complete, validated step with the lowest validation error (`ranking_metric`; the
    later one of equals).

    Args:
      manager: the run's checkpoint manager.

    Returns:
      A step number, or None if no complete step was validated.
    """
    scored = []
    for step in complete_steps(manager):
        metrics = read_meta(manager, step).get(VALIDATION) or {}
        if ranking_metric(metrics) is not None:
            scored.append((ranking_metric(metrics), -step))
    return -min(scored)[1] if scored else None


def resolve_step(manager: ocp.CheckpointManager, step: int | str | None) -> int:
    """Turns None / "best" / "latest" / a number into an existing, complete step.

    Args:
      manager: the run's checkpoint manager.
      step: a step number (int or digits), "best", "latest", or None (best if any step
        was validated, else latest).

    Returns:
      The step number.

    Raises:
      ValueError: if there is no checkpoint, or not the one asked for.
    """
    steps = complete_steps(manager)
    if not steps:
        raise ValueError(
            f"No checkpoint found in {manager.directory}; train first or check the path.")
    if step in (None, "best"):
        found = best_step(manager)
        if found is not None:
            return found
        if step == "best":
            raise ValueError(f"No validated checkpoint in {manager.directory}; "
                             "use a step number or 'latest'.")
        return max(steps)
    if step == "latest":
        return max(steps)
    if not str(step).isdigit() or int(step) not in steps:
        raise ValueError(
            f"Step {step} is not in {manager.directory}; available steps: {sorted(steps)}.")
    return int(step)


class LoadedCheckpoint(NamedTuple):
    """What `load_checkpoint` read: the variables, the run's config and the step."""

    variables: dict[str, Any]
    config: ml_collections.ConfigDict
    step: int


def load_variables(
    path: str, step: int | str | None = None
) -> tuple[dict[str, Any], ml_collections.ConfigDict]:
    """Loads a checkpoint's parameters and the config of the run that wrote it.

    Args:
      path: a workdir, or a directory of step checkpoints.
      step: a step number, "latest", "best", or None (best if any was validated, else latest).

    Returns:
      ({"params": params[, "batch_stats": running statistics]} as host arrays, the run's
      config).

    Raises:
      ValueError: if the path holds no checkpoint (or not the step asked for).
    """
    loaded = load_checkpoint(path, step)
    return loaded.variables, loaded.config


def load_checkpoint(path: str, step: int | str | None = None, *,
                    shapes_only: bool = False, config_only: bool = False) -> LoadedCheckpoint:
    """Like `load_variables`, and also says which step it chose.

    Args:
      path: a workdir, or a directory of step checkpoints.
      step: a step number, "latest", "best", or None (best if any was validated, else latest).
      shapes_only: read the variables' shapes and dtypes (jax.ShapeDtypeStruct leaves)
        from the checkpoint's metadata, not their values.
      config_only: read the run config alone (the variables are None).

    Returns:
      A LoadedCheckpoint: ({"params": params} as host arrays, with "batch_stats" for nets
      with batch norm; the run's config; the step).

    Raises:
      ValueError: if the path holds no checkpoint (or not the step asked for).
    """
    directory = checkpoint_dir(path)
    if not os.path.isdir(directory):
        raise ValueError(
            f"Checkpoint path {path} does not exist; pass a workdir with checkpoints/.")
    manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(read_only=True, create=False),
        item_handlers=_item_handlers(training=False),
    )
    chosen = resolve_step(manager, step)
    if config_only:
        config = ml_collections.ConfigDict(read_meta(manager, chosen)["config"])
        manager.close()
        return LoadedCheckpoint(None, config, chosen)
    # Host numpy targets: the checkpoint may come from another device layout (e.g. a
    # multi-host run), which a restore without targets would try to rebuild.
    metadata = manager.item_metadata(chosen)
    collections = [PARAMS] + ([BATCH_STATS] if metadata.get(BATCH_STATS) else [])
    if shapes_only:
        variables = {name: jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), metadata[name])
            for name in collections}
        restored = manager.restore(chosen, args=ocp.args.Composite(
            **{META: ocp.args.JsonRestore()}))
    else:
        items = {name: ocp.args.StandardRestore(jax.tree.map(
            lambda leaf: np.zeros(leaf.shape, leaf.dtype), metadata[name]))
            for name in collections}
        restored = manager.restore(
            chosen, args=ocp.args.Composite(**items, **{META: ocp.args.JsonRestore()}))
        variables = {name: restored[name] for name in collections}
    manager.close()
    config = ml_collections.ConfigDict(restored[META]["config"])
    return LoadedCheckpoint(variables, config, chosen)


def save_variables(directory: str, variables: Mapping[str, Any], config, step: int = 0) -> str:
    """Writes a weights-only checkpoint (params + meta) that `load_variables` reads.

    Args:
      directory: the workdir to write into (created; its checkpoints/ holds the step).
      variables: {"params": ...}, with "batch_stats" for nets with batch norm.
      config: the config describing the net and its preprocessing.
      step: the step number to record.

    Returns:
      The workdir path.
    """
    manager = ocp.CheckpointManager(
        os.path.join(os.path.abspath(os.path.expanduser(directory)), CHECKPOINT_SUBDIR),
        options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False),
        item_handlers=_item_handlers(training=False),
    )
    items = {name: ocp.args.StandardSave(variables[name])
             for name in (PARAMS, BATCH_STATS) if variables.get(name)}
    manager.save(
        step,
        args=ocp.args.Composite(**items, **{
            META: ocp.args.JsonSave({"config": config_to_json(config)}),
        }),
        force=True,
    )
    manager.wait_until_finished()
    manager.close()
    return directory


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
