"""The run state: everything a training run carries from one step to the next, as one value
that a checkpoint saves and restores whole.

  train               the train state: parameters, optimiser state, dropout key, batch-norm
                      statistics, and `step`, the optimiser steps done
  step                the same count on the host, so the loop never waits on the device to
                      read it
  plateau             the plateau rule's state (`optim.PlateauState`)
  data_position       the training stream's position after the batches of `step` (grain's
                      own state, as bytes: the same file a grain iterator saves)
  last_validation     the step and metrics of the latest validation (None before the first)
  validation_pending  a stop saved an epoch end before its due validation; the resumed run
                      validates first

In a checkpoint (vgg_jax.training.checkpoint) the arrays go to the `params`,
`batch_stats` and `train` items, the position to `data`, and the rest to the JSON `meta`
item as "run", beside the run's "config". Only a step that was validated carries its own
metrics ("validation"), so "best" ranks validated steps alone.

Resuming (`read`): a step whose files cannot be read is damaged (the caller moves it
aside and tries the one before); a step that reads but does not fit what this config
builds (other settings that fix the state's shapes, an older version's layout) raises
ConfigError naming the settings, before any work and without moving anything.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from vgg_jax.config_values import ConfigError, require
from vgg_jax.models import canonical_version
from vgg_jax.training import checkpoint, optim
from vgg_jax.training.state import TrainState
from vgg_jax.weights import run_checkpoint

# Fields a resumed run must share with the run that saved the checkpoint: they fix the
# shapes of the saved state, what a step means, and the data iterator's saved position.
RESUME_FIELDS = (
    "model.version", "model.num_classes", "model.width_divisor", "model.fc_features",
    "model.batch_norm", "model.box_regression",
    "data.image_size", "data.source", "data.name", "data.train_split", "data.num_workers",
    "train.batch_size", "train.grad_accum_steps", "train.frozen_layers", "seed",
)
# Fields that may change between runs but also decide which arrays the optimiser keeps
# (a clip, a decay or momentum switched on or off): named when the layouts differ.
OPTIMISER_LAYOUT_FIELDS = (
    "train.grad_clip_norm", "train.weight_decay", "train.momentum", "train.decay_biases",
)
# The meta item's entry holding the run state's host part.
RUN = "run"
_MISSING = object()


class Validation(NamedTuple):
    """One validation: the step it validated and its metrics (val/...)."""

    step: int
    metrics: dict[str, float]


@dataclasses.dataclass(frozen=True)
class RunState:
    """Everything a run carries from step to step (see the module docstring)."""

    train: TrainState
    step: int
    plateau: optim.PlateauState
    data_position: bytes
    last_validation: Validation | None = None
    validation_pending: bool = False

    @property
    def validated_now(self) -> dict[str, float] | None:
        """The metrics of this step's own validation, or None when it was not validated."""
        v = self.last_validation
        return dict(v.metrics) if v is not None and v.step == self.step else None

    def host_json(self) -> dict[str, Any]:
        """The host part of the state as JSON values (the meta item's "run")."""
        v = self.last_validation
        return {"step": self.step, "plateau": self.plateau.to_json(),
                "last_validation": None if v is None else {"step": v.step,
                                                           "metrics": dict(v.metrics)},
                "validation_pending": self.validation_pending}

    def with_host_json(self, values: Mapping[str, Any]) -> RunState:
        """This state with the host part `host_json` wrote.

        Args:
          values: a meta item's "run".

        Returns:
          The new state (train state and data position unchanged).
        """
        v = values["last_validation"]
        return dataclasses.replace(
            self, step=int(values["step"]),
            plateau=optim.PlateauState.from_json(values["plateau"]),
            last_validation=None if v is None else Validation(int(v["step"]),
                                                              dict(v["metrics"])),
            validation_pending=bool(values["validation_pending"]))


class _Position:
    """A data position as grain's checkpoint handler saves and restores an iterator's:
    `get_state` -> bytes, `set_state(bytes)`, `start_prefetch`."""

    def __init__(self, state: bytes = b""):
        self.state = state

    def get_state(self) -> bytes:
        return self.state

    def set_state(self, state: bytes) -> None:
        self.state = state

    def start_prefetch(self) -> None:
        """Nothing to start: a position only."""


def _train_item(state: TrainState) -> dict[str, Any]:
    return {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}


def save(manager: ocp.CheckpointManager, run: RunState, config: ml_collections.ConfigDict,
         epoch: int) -> None:
    """Starts an asynchronous save of the run state at its step (every process calls it).

    Args:
      manager: from `checkpoint.create_manager`.
      run: the run state.
      config: the run's config (saved with it).
      epoch: the epoch `run.step` ends or lies in.
    """
    meta = {"config": run_checkpoint.config_to_json(config), "epoch": epoch,
            RUN: run.host_json()}
    validated = run.validated_now
    if validated is not None:
        meta[run_checkpoint.VALIDATION] = validated
    checkpoint.save(manager, run.step, params=run.train.params,
                    batch_stats=run.train.batch_stats, train=_train_item(run.train),
                    data_iterator=_Position(run.data_position), meta=meta,
                    metrics=validated)


def read(manager: ocp.CheckpointManager, step: int, like: RunState,
         config: ml_collections.ConfigDict, workdir: str, *, arrays: bool = True) -> RunState:
    """Reads the run state of one step, once it is known to fit this config.

    Args:
      manager: the run's checkpoint manager.
      step: a complete step.
      like: a run state of this config (its arrays may be jax.ShapeDtypeStructs, e.g.
        from jax.eval_shape); gives the layout, shardings and dtypes to restore into.
      config: this run's config.
      workdir: the run's directory, for messages.
      arrays: False reads the host part only (metadata, no array data): `like`'s train
        state and data position come back unchanged.

    Returns:
      The saved run state.

    Raises:
      ConfigError: the step was saved under settings this run cannot continue (a mismatch,
        not damage: nothing is wrong with its files).
      Exception: anything else means the step's files are damaged.
    """
    meta = run_checkpoint.read_meta(manager, step)
    check_resumable(meta.get("config") or {}, config, workdir)
    require(RUN in meta, f"{workdir} holds checkpoints without a run state (weights only, or "
            "saved by an older version of vgg_jax), which training cannot continue; pass a "
            "new --workdir (they still load for --mode=eval and --config.init_from).")
    _check_layout(manager, step, like.train, meta.get("config") or {}, config, workdir)
    saved = like.with_host_json(meta[RUN])
    if not arrays:
        return saved
    position = _Position()
    params, train, batch_stats = checkpoint.restore_training(
        manager, step, params_target=like.train.params, train_target=_train_item(like.train),
        data_iterator=position, batch_stats_target=like.train.batch_stats)
    state = like.train.replace(params=params, step=train["step"], opt_state=train["opt_state"],
                               rng=train["rng"], batch_stats=batch_stats)
    return dataclasses.replace(saved, train=state, data_position=position.state)


def check_resumable(saved_config: Mapping[str, Any], config: ml_collections.ConfigDict,
                    workdir: str) -> None:
    """Checks that a run can resume from a checkpoint saved under `saved_config`.

    Args:
      saved_config: the config stored with the checkpoint (JSON: tuples are lists).
      config: this run's config.
      workdir: the run's directory, for the message.

    Raises:
      ConfigError: naming every field of RESUME_FIELDS whose value differs.
    """
    differences = _differences(RESUME_FIELDS, saved_config, config)
    require(not differences,
            f"{workdir} holds a run saved with other settings, {'; '.join(differences)}; "
            "rerun with the saved values to resume it, or pass a new --workdir.")


def _differences(fields, saved_config: Mapping[str, Any],
                 config: ml_collections.ConfigDict) -> list[str]:
    """'config.<field>=<value> (saved: <value>)' for each of `fields` whose values differ."""
    differences, current_config = [], config.to_dict()
    for path in fields:
        saved, current = saved_config, current_config
        for key in path.split("."):
            saved = saved.get(key, _MISSING) if isinstance(saved, Mapping) else _MISSING
            current = current.get(key, _MISSING) if isinstance(current, Mapping) else _MISSING
        if saved is _MISSING or current is _MISSING:
            continue  # a field older checkpoints did not record
        if path == "model.version":
            saved, current = canonical_version(saved), canonical_version(current)
        if json.loads(json.dumps(saved)) != json.loads(json.dumps(current)):
            differences.append(f"config.{path}={current!r} (saved: {saved!r})")
    return differences


# How a node without arrays (optax's EmptyState, MaskedNode; orbax writes None) shows in
# a layout.
_EMPTY = "no arrays"


def _layout(tree: Any, saved: bool) -> dict[tuple[str, ...], Any]:
    """Path -> (shape, dtype) of every array of a tree, and -> _EMPTY for every node
    without arrays, so that two trees have equal layouts exactly when orbax can restore
    one into the other. `saved`: the tree is orbax's metadata of a saved item (containers
    as dicts and lists, empty nodes as None); otherwise it is put in that form first."""
    if not saved:
        tree = ocp.tree.serialize_tree(tree, keep_empty_nodes=True)

    def empty(node) -> bool:
        return node is None or (isinstance(node, (tuple, list, dict)) and not node)

    def key(entry) -> str:
        for attribute in ("key", "name", "idx"):
            if hasattr(entry, attribute):
                return str(getattr(entry, attribute))
        return str(entry)

    return {tuple(key(k) for k in path): _EMPTY if empty(leaf) else
            (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=empty)[0]}


def _check_layout(manager: ocp.CheckpointManager, step: int, train: TrainState,
                  saved_config: Mapping[str, Any], config: ml_collections.ConfigDict,
                  workdir: str) -> None:
    """Raises ConfigError when the step's saved arrays (their paths, shapes and dtypes, from
    its metadata: no array is read) or the places of its empty nodes differ from those
    this config builds; orbax would otherwise fail deep inside, or worse restore the saved
    shapes into the new net."""
    metadata = manager.item_metadata(step)
    for item, built in ((run_checkpoint.PARAMS, train.params),
                        (run_checkpoint.BATCH_STATS, train.batch_stats),
                        (checkpoint.TRAIN, _train_item(train))):
        saved_tree = metadata.get(item)
        saved = _layout(getattr(saved_tree, "tree", saved_tree) or {}, saved=True)
        wanted = _layout(built or {}, saved=False)
        if saved == wanted:
            continue
        path = min(set(saved.items()) ^ set(wanted.items()))[0]
        what = (f"{item}/{'/'.join(path)} is {saved.get(path, 'absent')} in the checkpoint "
                f"and {wanted.get(path, 'absent')} here")
        differences = _differences(RESUME_FIELDS + OPTIMISER_LAYOUT_FIELDS, saved_config,
                                   config)
        if differences:
            raise ConfigError(
                f"{workdir} holds a run saved with other settings, {'; '.join(differences)}, "
                f"which change the arrays it keeps ({what}); rerun with the saved values to "
                "resume it, or pass a new --workdir.")
        raise ConfigError(
            f"{workdir} holds a run whose saved state differs from what this version of "
            f"vgg_jax builds from the same settings ({what}); pass a new --workdir (its "
            "checkpoints still load for --mode=eval and --config.init_from).")
