"""The training loop: set-up, resume, the phases of a step, validation and the plateau rule.

The loop follows the paper's recipe (3.1): mini-batch SGD with momentum and weight decay,
dropout on FC6/FC7, the learning rate divided by 10 when validation top-1 error stalls.
What the loop carries from step to step is one `run_state.RunState` (train state, plateau
state, data position, the last validation, the step), saved and restored whole, so a
killed run continues exactly; the loop itself holds only resources (`_Resources`: the
compiled step, the data stream, the checkpoint manager, writers, signal handlers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from vgg_jax import metric_names as names
from vgg_jax.config_values import ConfigError
from vgg_jax.data import pipeline, sources, transforms
from vgg_jax.evaluation.evaluator import EvalNet, Evaluator
from vgg_jax.evaluation.protocols import SINGLE_CROP, Protocol
from vgg_jax.models import VGG, create_model_from_config
from vgg_jax.runtime import device_prefetch, parallel, profiling, stop_signals, workdir_lock
from vgg_jax.training import (
    checkpoint,
    checkpoint_recovery,
    optim,
    progress,
    run_state,
    warm_start,
    writers,
)
from vgg_jax.training import task as tasks
from vgg_jax.training.progress import StepCounts
from vgg_jax.training.run_state import RunState, Validation
from vgg_jax.training.state import TrainState, create_train_state
from vgg_jax.training.step import jit_train_step
from vgg_jax.weights import run_checkpoint

# Guards the images/s division when a log interval measured no time.
_TINY_SECONDS = 1e-9


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
        if isinstance(loop, RunState):  # finished before: nothing was started
            return progress.last_metrics(loop)
        releases.pop_all()  # from here on the loop holds them, and its close releases them
    try:
        loop.run()
    finally:
        loop.close()
    return progress.last_metrics(loop.run_state)


def _set_up(config: ml_collections.ConfigDict, workdir: str,
            releases: contextlib.ExitStack) -> _Loop | RunState:
    """The phases before the loop: mesh, checkpoints, net, optimiser, data, resume or warm
    start, the learning rate pushed from the plateau schedule, writers and signal
    handlers. Registers the release of each resource with `releases` as it is opened.

    Returns the saved run state instead when the run finished before (at its last step,
    or stopped by the plateau rule): it is reported at once, and nothing is built."""
    mesh = parallel.create_mesh()
    tc = config.train
    task = tasks.for_config(config)  # classification or localisation: records, loss, metrics
    # First: it checks the batch against the training split.
    counts = StepCounts.from_config(config, len(task.train_source))
    progress.warn_if_few_steps(counts, config)
    checkpoint_recovery.set_aside_unfinished(workdir)
    manager = checkpoint.create_manager(
        workdir, max_to_keep=config.checkpoint.max_to_keep, keep_best=config.checkpoint.keep_best
    )
    releases.callback(manager.close)
    model = create_model_from_config(config)
    tx = optim.create_optimizer(tc, frozen=model.frozen_parameters)
    fresh_state = functools.partial(create_train_state, model, tx, config.seed, mesh)
    resuming = bool(run_checkpoint.complete_steps(manager))
    if not resuming and config.init_from:
        warm_start.check_warm_start(config)  # from shapes, before the net is built
    # The run state's layout, from shapes alone (nothing compiled), to check the newest
    # checkpoint against this config before any work.
    run = RunState(train=jax.eval_shape(fresh_state), step=0, plateau=optim.plateau_init(tc),
                   data_position=b"")
    newest = _newest_if_finished(manager, run, config, counts, workdir) if resuming else None
    # Every process takes the same road (the others would wait for it in a collective).
    if checkpoint_recovery.all_processes(newest is not None):
        for line in progress.outcome(newest, counts, workdir, config, task.describe,
                                     rerun=True):
            logging.info(line)
        return newest

    # Batches reach the devices on a background thread, `device_prefetch` ahead of the step;
    # the run state records the position of the batches consumed.
    train_iter = device_prefetch.on_devices(iter(pipeline.train_dataset(
        config.data, global_batch_size=counts.micro_batch, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        source=task.train_source, transform=task.train_transform,
    )), mesh, config.data.device_prefetch)
    releases.callback(train_iter.close)
    run = dataclasses.replace(run, train=fresh_state(), data_position=train_iter.get_state())
    if resuming:
        run = _restore(manager, run, config, workdir)
        train_iter.set_state(run.data_position)
    elif config.init_from:
        run = dataclasses.replace(run, train=_initialise_from(run.train, config, mesh))
    # The learning rate lives in the optimiser state, set from the plateau schedule.
    run = dataclasses.replace(run, train=_set_learning_rate(
        run.train, optim.plateau_lr_scale(run.plateau, tc), tc))

    writer = writers.create_writer(
        config, workdir, is_main_process=jax.process_index() == 0,
        total_steps=counts.total_steps, initial_step=run.step)
    releases.callback(writer.close)
    # A second Ctrl-C exits at once, after stopping the data workers.
    preemption = stop_signals.StopSignals(
        release=functools.partial(_close_data, train_iter, exiting=True))
    releases.callback(preemption.restore)
    profiler = profiling.StepProfiler(workdir, tc.profile_first_step, tc.profile_num_steps)
    releases.callback(profiler.close)
    resources = _Resources(
        config=config, workdir=workdir, task=task, counts=counts,
        train_step=jit_train_step(model, config.data, sums_fn=task.step_sums,
                                  grad_accum_steps=tc.grad_accum_steps),
        validate=validation_fn(model, config, mesh), train_iter=train_iter, manager=manager,
        writer=writer, preemption=preemption, profiler=profiler)
    return _Loop(resources, run)


def validation_fn(model: VGG, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    """The validation that training runs after each epoch: variables -> val/ metrics.

    Args:
      model: the net.
      config: the run config (data; config.eval.batch_size images per global batch).
      mesh: the data mesh.

    Returns:
      A function of the replicated variables returning {val/loss, val/top1_error,
      val/top5_error, val/count} (a box net's: {val/loss, val/loc_error, val/count}, from
      vgg_jax.training.task).
    """
    if (task_validation := tasks.validation_fn(model, config, mesh)) is not None:
        return task_validation
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


def _newest_if_finished(manager, like: RunState, config: ml_collections.ConfigDict,
                        counts: StepCounts, workdir: str) -> RunState | None:
    """The newest checkpoint's run state if it ends the run (None otherwise), once it is
    known to fit this config (ConfigError otherwise): from its metadata, then, if
    finished, read whole into the arrays' shapes alone (nothing compiled, no worker
    started), so that a damaged last step is left to the restore's walk, which moves it
    aside and redoes it from the step before."""
    step, found, mismatch = run_checkpoint.complete_steps(manager)[-1], None, ""
    # Around the attempts: a failing read closes orbax's event loop before it raises.
    with checkpoint_recovery.LateReadsOfFailedRestoresIgnored() as late_reads:
        try:
            found = run_state.read(manager, step, like, config, workdir, arrays=False)
            if progress.finished(found, counts):
                run_state.read(manager, step, like, config, workdir)
            else:
                found = None
        except ConfigError as error:
            mismatch = str(error)
        except Exception:  # damaged: moved aside by the restore's walk over the steps
            found, late_reads.failed = None, True
    # Every process stops on a mismatch that any of them found.
    mismatch = parallel.first_failure("resume.newest", mismatch)
    if mismatch:
        raise ConfigError(mismatch)
    return found


def _restore(manager, like: RunState, config: ml_collections.ConfigDict,
             workdir: str) -> RunState:
    """The run state of the newest step that restores, walking the steps from the newest
    down once: damaged ones are moved aside, a mismatch stops the run (ConfigError)."""
    step, run = checkpoint_recovery.newest_that_restores(
        manager, lambda step: run_state.read(manager, step, like, config, workdir))
    logging.info("Resumed from step %d of %s.", step, manager.directory)
    return run


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


@dataclasses.dataclass(frozen=True)
class _Resources:
    """What the loop runs with: its config and step counts, the compiled step and
    validation, and what it holds open (data stream, checkpoints, writers, signal
    handlers, profiler)."""

    config: ml_collections.ConfigDict
    workdir: str
    task: tasks.Task
    counts: StepCounts
    train_step: Callable
    validate: Callable[[Mapping[str, Any]], dict[str, float]]
    train_iter: device_prefetch.DevicePrefetcher
    manager: Any
    writer: writers.MetricWriter
    preemption: stop_signals.StopSignals
    profiler: profiling.StepProfiler

    def close(self) -> None:
        """Waits for the last checkpoint and releases files, workers and signal handlers.

        Every release runs even when an earlier one raises (a failed asynchronous save
        re-raises in `wait_until_finished`): workers and signal handlers are never left
        behind.
        """
        with contextlib.ExitStack() as releases:  # runs its callbacks last-in, first-out
            releases.callback(self.preemption.restore)
            releases.callback(_close_data, self.train_iter)
            releases.callback(self.writer.close)
            releases.callback(self.manager.close)
            releases.callback(self.manager.wait_until_finished)
            releases.callback(self.profiler.close)


def _close_data(train_iter: device_prefetch.DevicePrefetcher, exiting: bool = False) -> None:
    """Stops the data stream and its workers.

    Every batch's shared-memory block is unlinked here, not left to the resource tracker's
    clean-up at exit (which reports it as leaked): on CPU, jax arrays alias the batches'
    shared memory, so they are collected before grain's workers stop; the batches grain
    read ahead become garbage in reference cycles when it closes, so they are collected
    after. `exiting`: the process ends at once next, so grain's unlinking is waited for.
    """
    gc.collect()
    train_iter.close()
    gc.collect()
    if exiting:
        pipeline.finish_shared_memory_release()


@dataclasses.dataclass
class _LogInterval:
    """The training metrics since the last log line, and when that interval began."""

    pending: list[Mapping[str, jax.Array]] = dataclasses.field(default_factory=list)
    start: float = dataclasses.field(default_factory=time.perf_counter)


class _Loop:
    """The training loop: its resources and the run state it carries from step to step, and
    its phases (train step, log, finiteness check, validation, plateau rule, checkpoint,
    stop) as methods.

    Args:
      resources: what the loop runs with.
      run: the run state to continue from.
    """

    def __init__(self, resources: _Resources, run: RunState):
        self.res = resources
        self.run_state = run
        self.interval = _LogInterval()

    def run(self) -> None:
        """Steps until the last epoch, a stall after the last learning-rate cut, or a stop
        signal; saves the final step and reports the outcome."""
        tc, counts = self.res.config.train, self.res.counts
        if self.run_state.validation_pending:
            # The stopped run saved this epoch end before validating it; validating now,
            # before the next step, gives the plateau rule what the uninterrupted run had.
            self._validate_and_adjust()
            self.interval = _LogInterval()
        if not progress.finished(self.run_state, counts):
            # XLA compiles the step on its first call: seconds on a CPU, up to a minute for
            # VGG-16 on a GPU, which would otherwise pass in silence.
            logging.info("Compiling the train step (%d images per call); the first step "
                         "waits for it.", counts.micro_batch)
        while not progress.finished(self.run_state, counts):
            self._train_step()
            step = self.run_state.step
            preempted = self.res.preemption.reached(step)
            epoch_end = step % counts.steps_per_epoch == 0
            if step % tc.log_every_steps == 0 or epoch_end:
                self._log()
            due = epoch_end and self._epoch() % tc.eval_every_epochs == 0
            if due and not preempted:
                self._validate_and_adjust()
                self._save()
            elif step % tc.checkpoint_every_steps == 0 or preempted:
                self._check_finite()
                # A stop saves first: a validation (minutes on 50k images) could outlast a
                # preemption's grace period. The resumed run validates before going on.
                self.run_state = dataclasses.replace(self.run_state, validation_pending=due)
                self._save()
            if not self.interval.pending:
                # Logged at this step: the next interval's images/s starts after the
                # validation and saving above, which are not training time.
                self.interval = _LogInterval()
            if preempted:
                later = " (its validation runs first)" if self.run_state.validation_pending else ""
                self.res.writer.log_text(f"{self.res.preemption.signal_name}: saved step "
                                         f"{step}; rerun the same command to resume{later}.")
                break
        self._finish()

    def _finish(self) -> None:
        run = self.run_state
        if run.plateau.should_stop:
            self.res.writer.log_text(f"Stopping at step {run.step}: validation stalled after "
                                     "the last learning-rate cut.")
        elif progress.finished(run, self.res.counts) and self.res.manager.latest_step() != run.step:
            self._save()
        if progress.finished(run, self.res.counts):
            self.res.writer.end_at(run.step)  # the real end: the bar is complete there
        for line in progress.outcome(run, self.res.counts, self.res.workdir, self.res.config,
                                     self.res.task.describe):
            self.res.writer.log_text(line)

    def _epoch(self) -> int:
        return self.run_state.step // self.res.counts.steps_per_epoch

    def _train_step(self) -> None:
        """One optimiser step: `accum_steps` micro-batches (the optimiser state accumulates
        their gradients and updates on the last), so a checkpoint, taken only between
        steps, never holds a partial accumulation."""
        step = self.run_state.step + 1
        self.res.profiler.before_step(step)
        state = self.run_state.train
        for _ in range(self.res.counts.accum_steps):
            state, metrics = self.res.train_step(state, next(self.res.train_iter))
            self.interval.pending.append(metrics)
        self.res.profiler.after_step(step, (state, metrics))
        self.run_state = dataclasses.replace(
            self.run_state, train=state, step=step,
            data_position=self.res.train_iter.get_state())
        self.res.writer.advance(step)

    def _log(self) -> None:
        """Writes the training metrics since the last log (after the finiteness check)."""
        # One fetch for the check and the log; it waits for the steps, so time after it.
        host = jax.device_get(self.interval.pending)
        elapsed = time.perf_counter() - self.interval.start
        _check_finite(host, self.run_state.step, self.res.manager.latest_step())
        scalars = _train_scalars(host, self.res.counts.micro_batch, elapsed,
                                 self.res.task.train_metrics)
        scalars[names.LEARNING_RATE] = float(optim.get_learning_rate(
            self.run_state.train.opt_state))
        scalars[names.EPOCH] = self.run_state.step / self.res.counts.steps_per_epoch
        self.res.writer.write_scalars(self.run_state.step, scalars)
        self.interval = _LogInterval()

    def _check_finite(self) -> None:
        _check_finite(self.interval.pending, self.run_state.step, self.res.manager.latest_step())

    def _validate_and_adjust(self) -> None:
        """Validation, then the plateau rule: it may cut the learning rate or stop the run,
        and says why in one line."""
        tc, run = self.res.config.train, self.run_state
        metrics = self.res.validate(run.train.variables)
        self.res.writer.write_scalars(run.step, {**metrics, names.EPOCH: self._epoch()})
        plateau, decision = optim.plateau_update(run.plateau, optim.monitored_metric(metrics, tc),
                                                 tc)
        if decision.stalled:
            self.res.writer.log_text(optim.explain(decision, tc))
        train = run.train
        if decision.reduced:
            train = _set_learning_rate(train, decision.lr_scale, tc)
        self.run_state = dataclasses.replace(
            run, train=train, plateau=plateau, last_validation=Validation(run.step, metrics),
            validation_pending=False)

    def _save(self) -> None:
        run_state.save(self.res.manager, self.run_state, self.res.config, self._epoch())

    def close(self) -> None:
        """Waits for the last checkpoint and releases files, workers and signal handlers."""
        self.interval = _LogInterval()  # drops the last metrics' device arrays
        self.res.close()


def _check_finite(pending, step: int, last_saved: int | None) -> None:
    """Stops training on a non-finite loss or gradient, before anything bad is saved
    (`pending`: the steps' metrics, on the device or fetched)."""
    if pending and not all(bool(m) for m in jax.device_get([p["finite"] for p in pending])):
        saved = (f"The last good checkpoint is step {last_saved}" if last_saved is not None
                 else "No checkpoint was saved yet")
        raise FloatingPointError(
            f"Non-finite loss or gradient norm before step {step}; training stopped. {saved}; "
            "lower config.train.learning_rate or set config.train.grad_clip_norm, then rerun."
        )


def _train_scalars(host, micro_batch: int, elapsed: float,
                   task_metrics: Callable) -> dict[str, float]:
    """The log's scalars from the interval's metrics, fetched to the host."""
    return {
        **task_metrics(host),
        names.TRAIN_GRAD_NORM: float(np.mean([m["grad_norm"] for m in host])),
        names.TRAIN_SKIPPED_IMAGES: float(np.sum([m["skipped"] for m in host])),
        names.TRAIN_IMAGES_PER_SEC: len(host) * micro_batch / max(elapsed, _TINY_SECONDS),
    }
