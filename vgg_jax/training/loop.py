"""The training loop: set-up, resume, the phases of a step, validation and the plateau rule.

The loop follows the paper's recipe (3.1): mini-batch SGD with momentum and weight decay,
dropout on FC6/FC7, the learning rate divided by 10 when validation top-1 error stalls.
Everything a resume needs (parameters, optimiser and plateau state, step, RNG, the data
iterator's position) is checkpointed together, so a killed run continues exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from vgg_jax.config_values import require
from vgg_jax.data import pipeline, sources, transforms
from vgg_jax.evaluation.evaluator import EvalNet, Evaluator
from vgg_jax.evaluation.metrics import summarize
from vgg_jax.evaluation.protocols import SINGLE_CROP, Protocol
from vgg_jax.models import VGG, create_model_from_config
from vgg_jax.runtime import device_prefetch, parallel, profiling, stop_signals, workdir_lock
from vgg_jax.training import checkpoint, checkpoint_recovery, optim, warm_start, writers
from vgg_jax.training import metric_names as names
from vgg_jax.training.state import TrainState, create_train_state
from vgg_jax.training.step import jit_train_step

# Guards the images/s division when a log interval measured no time.
_TINY_SECONDS = 1e-9
# Checkpoint metadata: true when a stop saved an epoch end before its due validation.
_VALIDATION_PENDING = "validation_pending"


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains with periodic validation and checkpoints; resumes from the workdir if possible.

    Holds the workdir's lock (`workdir_lock`) for the whole run, so a second run into the
    same workdir fails at once instead of corrupting this one.

    Args:
      config: a validated run config.
      workdir: where checkpoints, metrics.jsonl and wandb files go.

    Returns:
      The metrics of the last validation.

    Raises:
      workdir_lock.WorkdirError: the workdir is not writable or another run holds it.
    """
    lock = workdir_lock.acquire(workdir, jax.process_index(), jax.process_count())
    try:
        return _train_and_evaluate(config, workdir)
    finally:
        lock.release()


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Sets up the loop (`_set_up`), runs it, and releases what it holds."""
    # A set-up that fails part way (a restore that fails, init_from, the writers' start-up)
    # releases at once what it already opened: the data thread and workers, the checkpoint
    # manager, the writers, the signal handlers. A CLI run would exit anyway; a notebook
    # or a test calling train_and_evaluate goes on and would keep them.
    with contextlib.ExitStack() as releases:
        loop = _set_up(config, workdir, releases)
        releases.pop_all()  # from here on the loop holds them, and its close releases them
    try:
        loop.run()
    finally:
        loop.close()
    return loop.last_eval


def _set_up(config: ml_collections.ConfigDict, workdir: str,
            releases: contextlib.ExitStack) -> _Loop:
    """The phases before the loop: mesh, checkpoints, net, optimiser, data, resume or weight
    transfer, the learning rate pushed from the plateau schedule, writers and signal
    handlers. Registers the release of each resource with `releases` as it is opened."""
    mesh = parallel.create_mesh()
    tc = config.train
    counts = StepCounts.from_config(config)  # first: it checks the batch against the split
    checkpoint_recovery.set_aside_unfinished(workdir)
    manager = checkpoint.create_manager(
        workdir, max_to_keep=config.checkpoint.max_to_keep, keep_best=config.checkpoint.keep_best
    )
    releases.callback(manager.close)
    resume_step = _check_resume(manager, config, workdir)
    if resume_step is None and config.init_from:
        warm_start.check_transfer(config)  # from shapes, before the net is built

    model = create_model_from_config(config)
    tx = optim.create_optimizer(tc, frozen=model.frozen_parameters)
    state = create_train_state(model, tx, config.seed, mesh)
    plateau = optim.plateau_init(tc)
    # Batches reach the devices on a background thread, `device_prefetch` ahead of the step;
    # checkpoints record the position of the batches consumed.
    train_iter = device_prefetch.on_devices(iter(pipeline.train_dataset(
        config.data, global_batch_size=counts.micro_batch, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )), mesh, config.data.device_prefetch)
    releases.callback(train_iter.close)

    last_eval, validation_pending = {}, False
    if resume_step is not None:
        resume_step, state, plateau, last_eval, validation_pending = _restore(
            manager, state, plateau, train_iter)
    elif config.init_from:
        state = _initialise_from(state, config, mesh)
    # The learning rate lives in the optimiser state, set from the plateau schedule.
    state = _set_learning_rate(state, optim.plateau_lr_scale(plateau, tc), tc)

    start_step = resume_step or 0
    writer = writers.create_writer(
        config, workdir, is_main_process=jax.process_index() == 0,
        total_steps=counts.total_steps, initial_step=start_step)
    releases.callback(writer.close)
    preemption = stop_signals.StopSignals()
    releases.callback(preemption.restore)
    profiler = profiling.StepProfiler(workdir, tc.profile_first_step, tc.profile_num_steps)
    releases.callback(profiler.close)
    return _Loop(
        config=config, counts=counts, train_step=jit_train_step(model, config.data),
        validate=validation_fn(model, config, mesh), train_iter=train_iter,
        manager=manager, state=state, plateau=plateau, step=start_step, last_eval=last_eval,
        last_saved=resume_step, validation_pending=validation_pending, writer=writer,
        preemption=preemption, profiler=profiler,
    )


@dataclasses.dataclass(frozen=True)
class StepCounts:
    """The run's step counts, fixed by its config. A step is one optimiser update: under
    gradient accumulation it runs `accum_steps` train-step calls on micro-batches, and every
    count the user sees (progress, log and checkpoint cadences, metrics' step, epoch,
    checkpoint numbers) is in these steps.

    Attributes:
      accum_steps: train-step calls per optimiser step (config.train.grad_accum_steps).
      micro_batch: images per train-step call (the batch over the accumulation steps).
      steps_per_epoch: optimiser steps in one epoch (every training image once, in whole
        steps).
      total_steps: optimiser steps in the whole run.
    """

    accum_steps: int
    micro_batch: int
    steps_per_epoch: int
    total_steps: int

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> StepCounts:
        """The counts of `config`'s run (reads the training split's size).

        Raises:
          ConfigError: the batch is larger than the training split (an epoch
            would hold no step).
        """
        tc = config.train
        num_train = pipeline.num_examples(config.data, config.data.train_split)
        steps_per_epoch = num_train // tc.batch_size
        require(steps_per_epoch > 0,
                f"config.train.batch_size={tc.batch_size} is larger than the training split "
                f"({num_train} images in {config.data.train_split!r}), so an epoch would hold "
                f"no step; use a batch of at most {num_train}.")
        return cls(accum_steps=tc.grad_accum_steps,
                   micro_batch=tc.batch_size // tc.grad_accum_steps,
                   steps_per_epoch=steps_per_epoch, total_steps=steps_per_epoch * tc.num_epochs)


def validation_fn(model: VGG, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    """The validation that training runs after each epoch: variables -> val/ metrics.

    Args:
      model: the net.
      config: the run config (data; config.eval.batch_size images per global batch).
      mesh: the data mesh.

    Returns:
      A function of the replicated variables returning {val/loss, val/top1_error,
      val/top5_error, val/count}.
    """
    d = config.data
    # The single-crop protocol at the paper's single test scale, without flips.
    protocol = Protocol(SINGLE_CROP, (transforms.single_test_scale(d.train_scale_min,
                                                                   d.train_scale_max),),
                        flip=False)
    evaluator = Evaluator(
        sources.make_source(d, str(d.eval_split)), protocol, model.image_size,
        batch_size=config.eval.batch_size, mesh=mesh, num_threads=max(1, int(d.num_workers)))

    def validate(variables) -> dict[str, float]:
        net = EvalNet("validation", model, variables, tuple(d.mean_rgb), tuple(d.std_rgb))
        summary = evaluator.validate(net)
        return {names.VAL_LOSS: summary["loss"], names.VAL_TOP1_ERROR: summary["top1_error"],
                names.VAL_TOP5_ERROR: summary["top5_error"], names.VAL_COUNT: summary["count"]}

    return validate


def _check_resume(manager, config: ml_collections.ConfigDict, workdir: str) -> int | None:
    """The step to resume from (None for a fresh run), once the saved run is known to be
    continuable under `config`."""
    found = checkpoint_recovery.newest_that_restores(
        manager, lambda step: checkpoint.read_meta(manager, step))
    if found is None:
        return None
    resume_step, meta = found
    # Before any work: a resume under other settings would fail deep in orbax or grain,
    # or worse, go on with a wrong step count.
    checkpoint.check_resumable(meta.get("config") or {}, config, workdir)
    return resume_step


def _restore(manager, state: TrainState, plateau, train_iter):
    """Restores state, plateau state and data position of the newest step that restores
    (moving damaged newer ones aside); returns (its step, state, plateau, the metrics of
    its last validation, whether a stop saved it before its due validation)."""
    step, (params, train, meta, batch_stats) = checkpoint_recovery.newest_that_restores(
        manager, lambda step: checkpoint.restore_training(
            manager, step, params_target=state.params,
            train_target=_train_item(state, plateau), data_iterator=train_iter,
            batch_stats_target=state.batch_stats))
    state = state.replace(params=params, step=train["step"], opt_state=train["opt_state"],
                          rng=train["rng"], batch_stats=batch_stats)
    logging.info("Resumed from step %d of %s.", step, manager.directory)
    return (step, state, train["plateau"], meta.get("metrics") or {},
            bool(meta.get(_VALIDATION_PENDING)))


def _initialise_from(state: TrainState, config: ml_collections.ConfigDict, mesh) -> TrainState:
    """Copies layers of `config.init_from` into the fresh state (vgg_jax.training.warm_start)."""
    params, batch_stats, lines = warm_start.initialise(
        config, jax.device_get(state.params), jax.device_get(state.batch_stats))
    for line in lines:
        logging.info(line)
    return state.replace(params=parallel.replicate(params, mesh),
                         batch_stats=parallel.replicate(batch_stats, mesh))


def _set_learning_rate(state: TrainState, lr_scale: float, tc) -> TrainState:
    return state.replace(opt_state=optim.set_learning_rate(
        state.opt_state, tc.learning_rate * lr_scale))


@dataclasses.dataclass
class _Loop:
    """The training loop: the state it carries from step to step, and its phases (train
    step, log, finiteness check, validation, plateau rule, checkpoint, stop) as methods."""

    config: ml_collections.ConfigDict
    counts: StepCounts
    train_step: Callable
    validate: Callable[[Mapping[str, Any]], dict[str, float]]
    train_iter: Any
    manager: Any
    writer: writers.MetricWriter
    preemption: stop_signals.StopSignals
    profiler: profiling.StepProfiler
    state: TrainState
    plateau: optim.PlateauState
    step: int
    last_eval: dict[str, float]
    last_saved: int | None
    # A stop at an epoch end saved before the epoch's validation: the resumed run runs it.
    validation_pending: bool = False
    pending: list[Mapping[str, jax.Array]] = dataclasses.field(default_factory=list)
    log_start: float = dataclasses.field(default_factory=time.perf_counter)
    stalled: bool = False

    def run(self) -> None:
        """Steps until the last epoch, a stall after the last learning-rate cut, or a stop
        signal; saves the final step and reports the outcome."""
        tc, total = self.config.train, self.counts.total_steps
        # A run that already stopped on the plateau rule stays stopped when restarted.
        self.stalled = bool(np.asarray(self.plateau.should_stop))
        if self.validation_pending:
            # The stopped run saved this epoch end before validating it; validating now,
            # before the next step, gives the plateau rule what the uninterrupted run had.
            self._validate_and_adjust()
            self.validation_pending = False
            self.log_start = time.perf_counter()
            self._say_if_stalled()
        while self.step < total and not self.stalled:
            self._train_step()
            preempted = self.preemption.reached(self.step)
            epoch_end = self.step % self.counts.steps_per_epoch == 0
            if self.step % tc.log_every_steps == 0 or epoch_end:
                self._log()
            due = epoch_end and self._epoch() % tc.eval_every_epochs == 0
            if due and not preempted:
                self._validate_and_adjust()
                self._save()
            elif self.step % tc.checkpoint_every_steps == 0 or preempted:
                self._check_finite()
                # A stop saves first: a validation (minutes on 50k images) could outlast a
                # preemption's grace period. The resumed run validates before going on.
                self.validation_pending = due
                self._save()
            if not self.pending:
                # Logged at this step: the next interval's images/s starts after the
                # validation and saving above, which are not training time.
                self.log_start = time.perf_counter()
            if self._say_if_stalled():
                break
            if preempted:
                later = " (its validation runs first)" if self.validation_pending else ""
                self.writer.log_text(f"{self.preemption.signal_name}: saved step {self.step}; "
                                     f"rerun the same command to resume{later}.")
                break
        if self.step == total and self.last_saved != self.step:
            self._save()
        if self.step == total or self.stalled:
            self.writer.end_at(self.step)  # the real end: the bar is complete there
        self._report()

    def _say_if_stalled(self) -> bool:
        if self.stalled:
            self.writer.log_text(f"Stopping at step {self.step}: validation stalled after "
                                 "the last learning-rate cut.")
        return self.stalled

    def _epoch(self) -> int:
        return self.step // self.counts.steps_per_epoch

    def _train_step(self) -> None:
        """One optimiser step: `accum_steps` micro-batches (the optimiser state accumulates
        their gradients and updates on the last), so a checkpoint, taken only between
        steps, never holds a partial accumulation."""
        self.profiler.before_step(self.step + 1)
        for _ in range(self.counts.accum_steps):
            self.state, metrics = self.train_step(self.state, next(self.train_iter))
            self.pending.append(metrics)
        self.profiler.after_step(self.step + 1, (self.state, metrics))
        self.step += 1
        self.writer.advance(self.step)

    def _log(self) -> None:
        """Writes the training metrics since the last log (after the finiteness check)."""
        self._check_finite()
        elapsed = time.perf_counter() - self.log_start
        scalars = _train_scalars(self.pending, self.counts.micro_batch, elapsed)
        scalars[names.LEARNING_RATE] = float(optim.get_learning_rate(self.state.opt_state))
        scalars[names.EPOCH] = self.step / self.counts.steps_per_epoch
        self.writer.write_scalars(self.step, scalars)
        self.pending, self.log_start = [], time.perf_counter()

    def _check_finite(self) -> None:
        _check_finite(self.pending, self.step, self.last_saved)

    def _validate_and_adjust(self) -> None:
        """Validation, then the plateau rule: it may cut the learning rate or stop the run."""
        tc = self.config.train
        self.last_eval = self.validate(self.state.variables)
        self.writer.write_scalars(self.step, {**self.last_eval, names.EPOCH: self._epoch()})
        self.plateau, decision = optim.plateau_update(
            self.plateau, optim.monitored_metric(self.last_eval, tc), tc)
        if decision.reduced:
            self.writer.log_text(f"Validation stalled: learning rate cut to "
                                 f"{tc.learning_rate * decision.lr_scale:.2e}.")
        self.state = _set_learning_rate(self.state, decision.lr_scale, tc)
        self.stalled = decision.should_stop

    def _save(self) -> None:
        checkpoint.save(
            self.manager, self.step, params=self.state.params,
            batch_stats=self.state.batch_stats,
            train=_train_item(self.state, self.plateau),
            data_iterator=self.train_iter,
            meta={"config": checkpoint.config_to_json(self.config), "epoch": self._epoch(),
                  "metrics": dict(self.last_eval), _VALIDATION_PENDING: self.validation_pending},
            metrics=self.last_eval,
        )
        self.last_saved = self.step

    def _report(self) -> None:
        if not self.last_eval:
            return
        finished = ((self.step == self.counts.total_steps and not self.validation_pending)
                    or self.stalled)
        top1, top5 = self.last_eval[names.VAL_TOP1_ERROR], self.last_eval[names.VAL_TOP5_ERROR]
        self.writer.log_text(
            f"{'Finished' if finished else 'Stopped'} at step {self.step}; last validation: "
            f"top-1 error {100 * top1:.2f}% (accuracy {100 * (1 - top1):.2f}%), top-5 error "
            f"{100 * top5:.2f}%. Checkpoints: {self.manager.directory}")

    def close(self) -> None:
        """Waits for the last checkpoint and releases files, workers and signal handlers.

        Every release runs even when an earlier one raises (a failed asynchronous save
        re-raises in `wait_until_finished`): workers and signal handlers are never left behind.
        """
        with contextlib.ExitStack() as releases:  # runs its callbacks last-in, first-out
            releases.callback(self.preemption.restore)
            releases.callback(self._close_data)
            releases.callback(self.writer.close)
            releases.callback(self.manager.close)
            releases.callback(self.manager.wait_until_finished)
            releases.callback(self.profiler.close)

    def _close_data(self) -> None:
        # Every batch's shared-memory block is unlinked here, not left to the resource
        # tracker's clean-up at exit (which reports it as leaked): on CPU, jax arrays alias
        # the batches' shared memory, so they are collected before grain's workers stop;
        # the batches grain read ahead become garbage in reference cycles when it closes,
        # so they are collected after.
        self.pending = []
        gc.collect()
        self.train_iter.close()
        gc.collect()


def _train_item(state: TrainState, plateau) -> dict[str, Any]:
    # The plateau state is tiny and host-side: numpy, so every process holds the same copy.
    return {"step": state.step, "opt_state": state.opt_state, "rng": state.rng,
            "plateau": jax.device_get(plateau)}


def _check_finite(pending, step: int, last_saved: int | None) -> None:
    """Stops training on a non-finite loss or gradient, before anything bad is saved."""
    if pending and not all(bool(m) for m in jax.device_get([p["finite"] for p in pending])):
        saved = (f"The last good checkpoint is step {last_saved}" if last_saved is not None
                 else "No checkpoint was saved yet")
        raise FloatingPointError(
            f"Non-finite loss or gradient norm before step {step}; training stopped. {saved}; "
            "lower config.train.learning_rate or set config.train.grad_clip_norm, then rerun."
        )


def _train_scalars(pending, micro_batch: int, elapsed: float) -> dict[str, float]:
    host = jax.device_get(pending)
    summary = summarize(host)
    return {
        names.TRAIN_LOSS: summary["loss"],
        names.TRAIN_TOP1_ERROR: summary["top1_error"],
        names.TRAIN_TOP5_ERROR: summary["top5_error"],
        names.TRAIN_GRAD_NORM: float(np.mean([m["grad_norm"] for m in host])),
        names.TRAIN_SKIPPED_IMAGES: float(np.sum([m["skipped"] for m in host])),
        names.TRAIN_IMAGES_PER_SEC: len(pending) * micro_batch / max(elapsed, _TINY_SECONDS),
    }
