"""Our own runs' checkpoints as weights: read (a run's best, latest or any step) and written
weights-only, for evaluation, prediction, transfer, fine-tuning and conversion.

A checkpoint is a step directory under `<workdir>/checkpoints/`; these items hold the weights
and what describes them:

  params       the network parameters;
  batch_stats  the running batch-norm statistics, for nets with batch norm only;
  meta         JSON: the run's config (the net, its preprocessing, its scales) and, on a step
               that was validated, its validation's metrics ("validation").

Training adds its optimiser state and the data iterator's position to the same directories
(vgg_jax.training.checkpoint); nothing here needs them. Weight files converted from other
frameworks are written with `save_variables` and read the same way. "best" is the validated
step with the lowest validation error (a box net's: localisation error).
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

from vgg_jax import metric_names

CHECKPOINT_SUBDIR = "checkpoints"
PARAMS, BATCH_STATS, META = "params", "batch_stats", "meta"
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


def weight_handlers() -> dict[str, ocp.CheckpointHandler]:
    """The handler of each item that holds or describes the weights (fresh objects: orbax
    ties each to one manager)."""
    return {
        PARAMS: ocp.StandardCheckpointHandler(),
        BATCH_STATS: ocp.StandardCheckpointHandler(),
        META: ocp.JsonCheckpointHandler(),
    }


def config_to_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A JSON-safe dict of a config (tuples become lists)."""
    return json.loads(config.to_json_best_effort())


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


def best_step(manager: ocp.CheckpointManager, steps: list[int] | None = None) -> int | None:
    """The complete, validated step with the lowest validation error (`ranking_metric`; the
    later one of equals).

    Args:
      manager: the run's checkpoint manager.
      steps: its complete steps, when the caller has listed them already.

    Returns:
      A step number, or None if no complete step was validated.
    """
    scored = []
    for step in complete_steps(manager) if steps is None else steps:
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
        found = best_step(manager, steps)
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


def load_checkpoint(path: str, step: int | str | None = None, *,
                    shapes_only: bool = False, config_only: bool = False) -> LoadedCheckpoint:
    """Loads a checkpoint's weights, the config of the run that wrote it, and the step.

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
        item_handlers=weight_handlers(),
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
    """Writes a weights-only checkpoint (params + meta) that `load_checkpoint` reads.

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
        item_handlers=weight_handlers(),
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
