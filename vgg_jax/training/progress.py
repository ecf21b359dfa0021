"""How far a run goes and how it ends: the step counts its config fixes, whether a run
state is finished, and the lines that say so."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping

import ml_collections
from absl import logging

from vgg_jax.config_values import require
from vgg_jax.data import pipeline
from vgg_jax.training.run_state import RunState
from vgg_jax.weights import run_checkpoint

# Fewer optimiser steps than this between two validations, and the plateau rule judges
# progress on a handful of updates (SGD's momentum alone averages over ~10 at 0.9): the
# run is warned that it may cut and stop early.
_FEW_STEPS_PER_VALIDATION = 10


def check_config(train_config: ml_collections.ConfigDict) -> None:
    """The rules of config.train's batch, length, cadence and profile fields (the
    optimiser's own: `optim.check_config`).

    Args:
      train_config: config.train.

    Raises:
      ConfigError: one sentence naming the first bad field and the fix.
    """
    t = train_config
    require(t.batch_size >= 1, f"config.train.batch_size={t.batch_size} must be positive.")
    require(t.grad_accum_steps >= 1,
            f"config.train.grad_accum_steps={t.grad_accum_steps} must be at least 1 (1 means "
            "no accumulation).")
    require(t.batch_size % t.grad_accum_steps == 0,
            f"config.train.batch_size={t.batch_size} is not divisible by "
            f"config.train.grad_accum_steps={t.grad_accum_steps}; pick an accumulation count "
            "that divides the batch.")
    require(t.num_epochs >= 1, f"config.train.num_epochs={t.num_epochs} must be at least 1.")
    require(t.profile_num_steps >= 1,
            f"config.train.profile_num_steps={t.profile_num_steps} must be at least 1 "
            "(profiling is off while config.train.profile_first_step is -1).")
    for field in ("log_every_steps", "eval_every_epochs", "checkpoint_every_steps"):
        require(t[field] >= 1, f"config.train.{field}={t[field]} must be at least 1.")


def check_batch_split(train_config: ml_collections.ConfigDict, device_count: int,
                      process_count: int = 1) -> None:
    """Checks that the training batch splits evenly over the devices (validation pads its
    batches to whole multiples of the devices itself).

    Args:
      train_config: config.train (already through `check_config`).
      device_count: devices over all processes.
      process_count: number of processes.

    Raises:
      ConfigError: naming the batch field and a size that divides.
    """
    t = train_config
    micro_batch = t.batch_size // t.grad_accum_steps
    require(micro_batch % device_count == 0 and micro_batch % process_count == 0,
            f"config.train.batch_size={t.batch_size} (per accumulation step {micro_batch}) is "
            f"not divisible by the {device_count} devices; use a multiple of {device_count}.")


@dataclasses.dataclass(frozen=True)
class StepCounts:
    """The run's step counts, fixed by its config. A step is one optimiser update: under
    gradient accumulation it runs `accum_steps` train-step calls on micro-batches, and every
    count the user sees (progress, log and checkpoint cadences, metrics' step, epoch,
    checkpoint numbers) is in these steps.

    Attributes:
      train_images: images in the training split (of all processes).
      accum_steps: train-step calls per optimiser step (config.train.grad_accum_steps).
      micro_batch: images per train-step call (the batch over the accumulation steps).
      steps_per_epoch: optimiser steps in one epoch (every training image once, in whole
        steps).
      total_steps: optimiser steps in the whole run.
    """

    train_images: int
    accum_steps: int
    micro_batch: int
    steps_per_epoch: int
    total_steps: int

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict,
                    num_train: int | None = None) -> StepCounts:
        """The counts of `config`'s run.

        Args:
          config: the run config.
          num_train: the training records (default: the training split's size, read).

        Raises:
          ConfigError: the batch is larger than the training split (an epoch
            would hold no step).
        """
        tc = config.train
        if num_train is None:
            num_train = pipeline.num_examples(config.data, config.data.train_split)
        steps_per_epoch = num_train // tc.batch_size
        require(steps_per_epoch > 0,
                f"config.train.batch_size={tc.batch_size} is larger than the training split "
                f"({num_train} images in {config.data.train_split!r}), so an epoch would hold "
                f"no step; use a batch of at most {num_train}.")
        return cls(train_images=num_train, accum_steps=tc.grad_accum_steps,
                   micro_batch=tc.batch_size // tc.grad_accum_steps,
                   steps_per_epoch=steps_per_epoch, total_steps=steps_per_epoch * tc.num_epochs)


def warn_if_few_steps(counts: StepCounts, config: ml_collections.ConfigDict) -> None:
    """One warning line when validations come so often (in steps) that the plateau rule
    may cut the learning rate and end the run after a handful of updates (a small data
    set in a large batch: fine-tuning on a folder of a few dozen images)."""
    tc = config.train
    per_validation = counts.steps_per_epoch * tc.eval_every_epochs
    if per_validation >= _FEW_STEPS_PER_VALIDATION:
        return
    # The first validation always improves; then `patience` stalls before each cut, and
    # as many after the last one stop the run.
    earliest_stop = per_validation * (1 + tc.plateau_patience * (tc.plateau_max_reductions + 1))
    if earliest_stop >= counts.total_steps:
        return  # the rule cannot end the run early
    logging.warning(
        "Only %d optimiser step(s) between validations (%d training images, batch %d, a "
        "validation every %d epoch(s)): the plateau rule judges progress on so few updates "
        "that it may cut the learning rate %d times and stop the run after %d steps of the "
        "%d asked for; lower config.train.batch_size or raise config.train.eval_every_epochs "
        "for more steps per validation.", per_validation, counts.train_images, tc.batch_size,
        tc.eval_every_epochs, tc.plateau_max_reductions, earliest_stop, counts.total_steps)


def finished(run: RunState, counts: StepCounts) -> bool:
    """Whether the run is over: stopped by the plateau rule, or at its last step and
    validated as due."""
    return run.plateau.should_stop or (run.step >= counts.total_steps
                                       and not run.validation_pending)


def last_metrics(run: RunState) -> dict[str, float]:
    """The metrics of the run's last validation ({} before the first)."""
    return dict(run.last_validation.metrics) if run.last_validation else {}


def outcome(run: RunState, counts: StepCounts, workdir: str,
            config: ml_collections.ConfigDict, describe: Callable[[Mapping[str, float]], str],
            *, rerun: bool = False) -> list[str]:
    """The lines that end a run: "Finished" or "Stopped" at its step with its last
    validation, after, for a rerun of a finished run, why it does not go on.

    Args:
      run: the run state at the end.
      counts: this config's step counts.
      workdir: the run's directory.
      config: this run's config.
      describe: the task's validation metrics in words (`task.Task.describe`).
      rerun: the run had finished before this command started.

    Returns:
      The lines, in order.
    """
    lines = []
    if rerun and run.plateau.should_stop:
        lines.append(
            f"The plateau rule stopped this run at step {run.step} (validation stalled with "
            f"no learning-rate cut left, {run.plateau.num_reductions} made: the paper's end of "
            "training), so a larger config.train.num_epochs does not continue it; to train "
            f"on, start a new --workdir with --config.init_from={workdir}.")
    elif rerun and run.step > counts.total_steps:
        lines.append(f"This run went to step {run.step}, beyond the {counts.total_steps} that "
                     f"config.train.num_epochs={config.train.num_epochs} asks for.")
    status = "Finished" if finished(run, counts) else "Stopped"
    checkpoints = os.path.join(os.path.abspath(workdir), run_checkpoint.CHECKPOINT_SUBDIR)
    v = run.last_validation
    if v is None:
        lines.append(f"{status} at step {run.step}, not validated yet. Checkpoints: {checkpoints}")
        return lines
    at = "" if v.step == run.step else f" (step {v.step})"
    lines.append(f"{status} at step {run.step}; last validation{at}: {describe(v.metrics)}. "
                 f"Checkpoints: {checkpoints}")
    return lines
