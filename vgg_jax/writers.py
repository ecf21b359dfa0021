"""One metrics interface for training, with three backends.

* console: a tqdm progress bar over optimiser steps (rate, ETA, and the latest loss,
  learning rate and images/s), plus one printed line per evaluation with the train and
  validation loss and top-1/top-5 error;
* JSON lines: `<workdir>/metrics.jsonl`, one object per `write_scalars` call holding
  "step" and every scalar written (read back by `vgg_jax.plot`);
* Weights & Biases: mode from `config.wandb.mode`, files under `<workdir>/wandb/`, the
  same run resumed when training restarts in the same workdir.

Only the main process (JAX process 0) writes: `create_writer(..., is_main_process=False)`
returns a writer that does nothing, so the training loop needs no `if` around logging. Every
process calls `create_writer`: if process 0's writers fail to start, the others fail too
instead of going on into training without it.

Usage:

    with create_writer(config, workdir, is_main_process=jax.process_index() == 0,
                       total_steps=total, initial_step=step) as writer:
        for step in range(step + 1, total + 1):
            ...
            writer.advance(step)                       # every step: cheap, no device sync
            if step % config.train.log_every_steps == 0:
                writer.write_scalars(step, {TRAIN_LOSS: loss, LEARNING_RATE: lr, ...})
"""

from __future__ import annotations

import abc
import functools
import json
import logging
import math
import netrc
import os
import sys
import urllib.parse
from collections.abc import Mapping
from typing import Any, Self

import ml_collections
import numpy as np
import tqdm

from vgg_jax.config_values import require
from vgg_jax.metric_names import (
    EPOCH,
    LEARNING_RATE,
    STEP,
    TRAIN_IMAGES_PER_SEC,
    TRAIN_LOSS,
)

METRICS_FILENAME = "metrics.jsonl"
# Remembers the wandb run id, so a restarted job resumes the same run.
WANDB_RUN_ID_FILENAME = "wandb_run_id.txt"
WANDB_MODES = ("online", "offline", "disabled", "auto")
_WANDB_DEFAULT_HOST = "https://api.wandb.ai"
# The name under which the processes agree that process 0's writers started.
_WRITERS_STEP = "metrics_writers"

# Which metrics the end-of-evaluation console line shows, and how it labels them.
# (label, metric suffix, shown as a percentage) of the per-evaluation console line.
_SUMMARY_FIELDS = (
    ("loss", "loss", False), ("top-1 err", "top1_error", True), ("top-5 err", "top5_error", True)
)


class MetricWriter(abc.ABC):
    """Where training reports its metrics. Every method is a no-op on non-main processes.

    Usable as a context manager (closes on exit).
    """

    @abc.abstractmethod
    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Records scalar metrics at an optimiser step.

        Args:
          step: the optimiser step the values belong to (the x axis).
          scalars: metric name -> value; Python/numpy numbers or scalar jax arrays
            (fetched from the device here, so call it only every few steps).
        """

    def advance(self, step: int) -> None:
        """Tells the writer training reached `step` (moves the progress bar).

        Cheap and free of device synchronisation: call it every step.
        """

    def log_text(self, message: str) -> None:
        """Prints an informational message (without breaking the progress bar)."""

    def end_at(self, step: int) -> None:
        """Says training is over at `step`, possibly before the planned last step (the
        plateau rule stopped it): the progress bar ends there, complete and closed, so
        the lines printed after it (the final report) come below it.
        """

    def close(self) -> None:
        """Flushes and releases everything; the writer must not be used afterwards."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class NoOpWriter(MetricWriter):
    """Writes nothing: for processes other than the main one."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        del step, scalars


def _to_python(name: str, value: Any) -> float | int | bool:
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(
            f"Metric {name!r} must be a scalar, got an array of shape {array.shape}; "
            "reduce it (e.g. mean) before writing."
        )
    return array.reshape(()).item()


def _format_value(value: float) -> str:
    if isinstance(value, float) and (value == 0 or 1e-3 <= abs(value) < 1e4 or math.isnan(value)):
        return f"{value:.4f}"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


class ConsoleWriter(MetricWriter):
    """A progress bar over steps and a printed line per evaluation.

    The bar's postfix shows the latest loss, learning rate and images/s; an evaluation (a
    write that holds any "val/" metric) prints a line with the latest train and the new
    validation loss and errors. Without a bar, every write prints a line. Off a terminal
    (a SLURM log, a file, a pipe) there is no bar either: its carriage-return frames would
    pile up there, so the writes' plain lines report progress instead.
    """

    def __init__(
        self,
        *,
        total_steps: int,
        initial_step: int,
        show_progress: bool,
        images_per_step: int | None = None,
        stream=None,
    ):
        """Args:
        total_steps: the last step of training (the bar's total).
        initial_step: the step training starts from (non-zero on resume).
        show_progress: draw the tqdm bar when `stream` is a terminal; False (or not a
          terminal) prints every write instead.
        images_per_step: global batch size, to show images/s from the bar's own rate
          until a train/images_per_sec value is written.
        stream: where to write (default sys.stderr, like tqdm).
        """
        self._stream = stream if stream is not None else sys.stderr
        self._images_per_step = images_per_step
        self._latest: dict[str, float] = {}
        self._bar = None
        self._log_guard = None
        if show_progress and is_terminal(self._stream):
            self._bar = tqdm.tqdm(
                total=total_steps,
                initial=initial_step,
                unit="step",
                dynamic_ncols=True,
                file=self._stream,
            )
            self._log_guard = _LogRecordsAboveBar(self._stream)

    def _print(self, line: str) -> None:
        # tqdm.write keeps the bar intact below the printed line.
        tqdm.tqdm.write(line, file=self._stream)

    def advance(self, step: int) -> None:
        if self._bar is not None and step > self._bar.n:
            self._bar.update(step - self._bar.n)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self._latest.update(scalars)
        is_eval = any(name.startswith("val/") for name in scalars)
        if self._bar is None:
            if is_eval:
                self._print(self._summary_line(step))
            else:
                items = " ".join(f"{k}={_format_value(v)}" for k, v in scalars.items())
                self._print(f"step {step} | {items}")
            return
        self.advance(step)
        postfix = {}
        if TRAIN_LOSS in self._latest:
            postfix["loss"] = f"{self._latest[TRAIN_LOSS]:.4f}"
        if LEARNING_RATE in self._latest:
            postfix["lr"] = f"{self._latest[LEARNING_RATE]:.2g}"
        images_per_sec = self._latest.get(TRAIN_IMAGES_PER_SEC)
        rate = self._bar.format_dict.get("rate")
        if images_per_sec is None and rate and self._images_per_step:
            images_per_sec = rate * self._images_per_step
        if images_per_sec is not None:
            postfix["img/s"] = f"{images_per_sec:.1f}"
        self._bar.set_postfix(postfix, refresh=False)
        if is_eval:
            self._print(self._summary_line(step))

    def _summary_line(self, step: int) -> str:
        parts = [f"step {step}"]
        if EPOCH in self._latest:
            parts.append(f"epoch {self._latest[EPOCH]:.2f}")
        for split in ("train", "val"):
            fields = [
                f"{label} {100 * self._latest[f'{split}/{key}']:.2f}%" if percent
                else f"{label} {_format_value(self._latest[f'{split}/{key}'])}"
                for label, key, percent in _SUMMARY_FIELDS
                if f"{split}/{key}" in self._latest
            ]
            if fields:
                parts.append(f"{split} " + " ".join(fields))
        if LEARNING_RATE in self._latest:
            parts.append(f"lr {self._latest[LEARNING_RATE]:.3g}")
        return " | ".join(parts)

    def log_text(self, message: str) -> None:
        self._print(message)

    def end_at(self, step: int) -> None:
        if self._bar is not None:
            self._bar.total = step
            self._bar.update(step - self._bar.n)
            self.close()

    def close(self) -> None:
        if self._log_guard is not None:
            self._log_guard.remove()
            self._log_guard = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class _LogRecordsAboveBar:
    """While installed, each handler of the root logger (absl's among them) clears the bars
    on `stream` before it writes a record and redraws them below it after.

    The bar's frames end without a newline, so a log line written while the bar is shown
    (a warning from a library, a checkpoint message) would otherwise continue the bar's
    line. tqdm's own `logging_redirect_tqdm` only swaps plain StreamHandlers, and absl's
    handler is not one, so the handlers' `handle` is wrapped instead (absl's handler hands
    records on from `handle`, never calling its own `emit`).
    """

    def __init__(self, stream, logger: logging.Logger | None = None):
        self._stream = stream
        self._wrapped = []
        for handler in (logger or logging.getLogger()).handlers:
            # An instance attribute shadows the class's method; `remove` restores the
            # handler's own attribute, or deletes ours where it had none.
            own = handler.__dict__.get("handle")
            handler.handle = functools.partial(self._handle, handler.handle)
            self._wrapped.append((handler, handler.handle, own))

    def _handle(self, handle, record: logging.LogRecord):
        with tqdm.tqdm.external_write_mode(file=self._stream):
            return handle(record)

    def remove(self) -> None:
        """Gives the handlers back their own `handle` (left alone if replaced since)."""
        for handler, wrapper, own in self._wrapped:
            if handler.__dict__.get("handle") is not wrapper:
                continue
            if own is None:
                del handler.handle
            else:
                handler.handle = own
        self._wrapped = []


def is_terminal(stream) -> bool:
    """Whether `stream` is an interactive terminal (a progress bar's carriage returns belong
    only there: in a log file or a SLURM output they pile up as one line per frame).

    Args:
      stream: a file object, possibly closed or without `isatty`.

    Returns:
      True only for an open stream attached to a terminal.
    """
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def read_metrics(path: str) -> list[dict[str, Any]]:
    """Reads a metrics.jsonl file: one dict per line, blank lines skipped.

    A final line cut short (a job killed mid-write) is ignored; any other bad line raises.

    Args:
      path: the file.

    Returns:
      The records in file order.
    """
    with open(path) as f:
        lines = [line for line in f.read().split("\n") if line.strip()]
    records = []
    for index, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if index == len(lines) - 1:
                break
            raise ValueError(f"{path}, line {index + 1}: not valid JSON: {line[:80]!r}") from None
    return records


class JsonLinesWriter(MetricWriter):
    """Appends one JSON object per write to `<workdir>/metrics.jsonl`.

    Each object is {"step": step, name: value, ...}; NaN and infinities are written as
    NaN/Infinity (Python's json reads them back). A restarted run first drops the records
    of steps after the one it resumes from (the killed run's steps that it will redo), so
    every step appears once.
    """

    def __init__(self, workdir: str, initial_step: int = 0):
        """Args:
        workdir: the run's directory (created if needed).
        initial_step: the step training starts from; later records are dropped.
        """
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, METRICS_FILENAME)
        self._keep_records_up_to(initial_step)
        # Held open for the whole run (closed in close()), not per write.
        self._file = open(self.path, "a")  # noqa: SIM115

    def _keep_records_up_to(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        # read_metrics also drops a last line cut short by a kill, which appending after
        # would glue to the next record; rewriting the file is cheap (a line per log step).
        kept = [record for record in read_metrics(self.path) if record.get(STEP, 0) <= step]
        partial = self.path + ".tmp"
        with open(partial, "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in kept)
        os.replace(partial, self.path)  # atomic: a kill now leaves the old or the new file

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        record = {STEP: int(step), **scalars}
        self._file.write(json.dumps(record) + "\n")
        # Flushed every write: the file is read live (plots) and must survive a crash.
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def _wandb_api_key_configured() -> bool:
    """True if wandb has an API key: WANDB_API_KEY, or a netrc entry for its host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", _WANDB_DEFAULT_HOST)).hostname
    netrc_path = os.environ.get("NETRC", os.path.join(os.path.expanduser("~"), ".netrc"))
    try:
        return netrc.netrc(netrc_path).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, PermissionError):
        return False


def check_config(wandb_config: ml_collections.ConfigDict) -> None:
    """The rules of config.wandb.

    Args:
      wandb_config: config.wandb.

    Raises:
      ConfigError: naming the field and its valid values.
    """
    require(wandb_config.mode in WANDB_MODES,
            f"config.wandb.mode={wandb_config.mode!r} is unknown; use one of {WANDB_MODES}.")


def resolve_wandb_mode(mode: str) -> str:
    """Turns config.wandb.mode into the mode handed to wandb.init.

    Args:
      mode: "online", "offline", "disabled", or "auto": the WANDB_MODE environment
        variable if set, else "online" when an API key is configured (WANDB_API_KEY or a
        netrc entry, as written by `wandb login`), else "offline".

    Returns:
      "online", "offline" or "disabled".

    """
    if mode != "auto":
        return mode
    from_env = os.environ.get("WANDB_MODE", "")
    if from_env in ("online", "offline", "disabled"):
        return from_env
    if from_env == "dryrun":  # wandb's old name for offline
        return "offline"
    return "online" if _wandb_api_key_configured() else "offline"


class WandbWriter(MetricWriter):
    """Logs to a Weights & Biases run whose files live in `<workdir>/wandb/`.

    The run id is kept in `<workdir>/wandb_run_id.txt`, so a job restarted in the same
    workdir continues the same run (resume="allow"). Every metric is charted against our
    own "step" (define_metric), not wandb's internal step, so values re-logged after a
    resume from an earlier checkpoint are kept instead of dropped as out of order.
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, *, mode: str):
        """Args:
        config: the full config; reads config.wandb and logs the whole config to the run.
        workdir: the run's directory.
        mode: "online" or "offline" (resolved, see resolve_wandb_mode).
        """
        import wandb  # only imported when used: it is slow to import

        os.makedirs(workdir, exist_ok=True)
        id_path = os.path.join(workdir, WANDB_RUN_ID_FILENAME)
        run_id = None
        if os.path.exists(id_path):
            with open(id_path) as f:
                run_id = f.read().strip() or None
        wandb_config = config.wandb
        self._run = wandb.init(
            project=wandb_config.project or None,
            name=wandb_config.name or None,
            tags=list(wandb_config.tags) or None,
            dir=workdir,
            mode=mode,
            id=run_id,
            resume="allow",
            config=config.to_dict(),
            # Several writers (tests, or one per stage) may live in one process.
            reinit="create_new",
            # The console writer already reports progress; wandb's run summary at exit
            # would bury the last lines of training.
            settings=wandb.Settings(quiet=True),
        )
        if run_id is None:
            with open(id_path, "w") as f:
                f.write(self._run.id)
        self._defined: set[str] = set()

    @property
    def run(self):
        """The wandb Run (e.g. for its directory or id)."""
        return self._run

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for name in scalars:
            if name not in self._defined and name != STEP:
                self._run.define_metric(name, step_metric=STEP)
                self._defined.add(name)
        self._run.log({STEP: int(step), **scalars})

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


class MultiWriter(MetricWriter):
    """Fans every call out to several writers; fetches device values once per write."""

    def __init__(self, writers: list[MetricWriter]):
        self.writers = list(writers)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        values = {name: _to_python(name, value) for name, value in scalars.items()}
        for writer in self.writers:
            writer.write_scalars(step, values)

    def advance(self, step: int) -> None:
        for writer in self.writers:
            writer.advance(step)

    def log_text(self, message: str) -> None:
        for writer in self.writers:
            writer.log_text(message)

    def end_at(self, step: int) -> None:
        for writer in self.writers:
            writer.end_at(step)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def create_writer(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    is_main_process: bool,
    total_steps: int,
    initial_step: int = 0,
) -> MetricWriter:
    """Builds the metrics writer of a training run.

    Args:
      config: the full config; reads config.progress_bar, config.train.batch_size and
        config.wandb (mode, project, name, tags).
      workdir: the run's directory: metrics.jsonl and wandb/ are written inside.
      is_main_process: True on JAX process 0 only; other processes get a NoOpWriter.
      total_steps: the last optimiser step of training (progress bar and ETA).
      initial_step: the step training starts from (the restored step on resume).

    Every process of a multi-process job must call this: they agree on whether process 0's
    writers started (`parallel.first_failure`), so that a failure there stops them all.

    Returns:
      A MetricWriter: console + JSON lines (+ wandb unless its mode is "disabled"), or a
      NoOpWriter.

    Raises:
      parallel.PeerProcessError: on the other processes, when process 0's writers failed
        to start (process 0 raises its own error).
    """
    # Imported here: reading metrics (vgg_jax.plot) needs no jax.
    from vgg_jax import parallel

    writer: MetricWriter = NoOpWriter()
    if is_main_process:
        try:
            writer = _main_process_writer(config, workdir, total_steps, initial_step)
        except Exception as error:
            # The other processes would otherwise go on into training and wait in its
            # first collective for this one, until a jax timeout ends them.
            parallel.first_failure(_WRITERS_STEP, (
                f"Process 0 could not start its metrics writers ({type(error).__name__}: "
                f"{error}); see its log."))
            raise
    failure = parallel.first_failure(_WRITERS_STEP, "")
    if failure:
        writer.close()
        raise parallel.PeerProcessError(failure)
    return writer


def _main_process_writer(config: ml_collections.ConfigDict, workdir: str, total_steps: int,
                         initial_step: int) -> MetricWriter:
    """Console, JSON lines and wandb writers; those started are closed if a later one fails."""
    mode = resolve_wandb_mode(config.wandb.mode)
    # wandb first: the lines it prints while starting would otherwise be glued onto the
    # progress bar's line (the bar's frames end without a newline).
    wandb_writers = [WandbWriter(config, workdir, mode=mode)] if mode != "disabled" else []
    writers: list[MetricWriter] = []
    try:
        writers.append(ConsoleWriter(
            total_steps=total_steps,
            initial_step=initial_step,
            show_progress=bool(config.get("progress_bar", True)),
            images_per_step=config.train.batch_size,
        ))
        writers.append(JsonLinesWriter(workdir, initial_step=initial_step))
    except Exception:
        MultiWriter(writers + wandb_writers).close()
        raise
    return MultiWriter(writers + wandb_writers)
