"""Resuming past broken checkpoints: unfinished or damaged steps are moved aside, never
deleted, and training resumes from the newest step that restores.

Two kinds of broken step directory under `<workdir>/checkpoints/`:

* unfinished: a step-named directory without orbax's commit metadata (a copy cut short,
  a save on a file system without atomic renames killed midway). orbax counts it as a
  step, so the run could never save that step again ("Checkpoint for step N already
  exists"). `set_aside_unfinished` moves such directories before the manager is built.
* damaged: a finished step whose files no longer restore (truncated or deleted data
  files, a disk error). `newest_that_restores` tries the steps from the newest down, once,
  and moves each one that fails.

Both go to `<workdir>/checkpoints.damaged/<step>` (`<step>.1`, ... if that exists), with
one warning line each, so that nothing a user might still want is lost.

A step that reads but does not fit the run (saved under other settings) is not damage:
the restore raises ConfigError, and `newest_that_restores` stops there, moving nothing.
"""

from __future__ import annotations

import gc
import inspect
import logging as logging_lib
import os
import shutil
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from vgg_jax.config_values import ConfigError
from vgg_jax.runtime import parallel
from vgg_jax.weights.run_checkpoint import CHECKPOINT_SUBDIR, COMPLETE_MARKER, complete_steps

DAMAGED_SUBDIR = "checkpoints.damaged"

T = TypeVar("T")


def damaged_dir(checkpoints_directory: str) -> str:
    """Where broken steps of a checkpoints/ directory are moved: its sibling
    checkpoints.damaged/."""
    return os.path.join(os.path.dirname(os.path.normpath(str(checkpoints_directory))),
                        DAMAGED_SUBDIR)


def set_aside(checkpoints_directory: str, step: int, why: str) -> str:
    """Moves one step directory to checkpoints.damaged/ and says so in one warning line.

    Args:
      checkpoints_directory: the run's checkpoints/ directory.
      step: the step to move.
      why: the reason, completing "Checkpoint step N ...".

    Returns:
      The step directory's new path.
    """
    target_root = damaged_dir(checkpoints_directory)
    os.makedirs(target_root, exist_ok=True)
    target, suffix = os.path.join(target_root, str(step)), 0
    while os.path.exists(target):
        suffix += 1
        target = os.path.join(target_root, f"{step}.{suffix}")
    shutil.move(os.path.join(str(checkpoints_directory), str(step)), target)
    logging.warning("Checkpoint step %d %s; moved it to %s.", step, why, target)
    return target


def _sync(name: str) -> None:
    # Several processes share the workdir: only process 0 moves, the others wait for it.
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"vgg_jax.training.checkpoint_recovery.{name}")


def set_aside_unfinished(workdir: str) -> list[int]:
    """Moves step directories without orbax's commit metadata out of the way; call it
    before building the run's checkpoint manager (which would count them as steps).

    Args:
      workdir: the run's directory.

    Returns:
      The steps moved.
    """
    directory = os.path.join(workdir, CHECKPOINT_SUBDIR)
    names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    unfinished = [int(name) for name in names if name.isdigit()
                  and not os.path.exists(os.path.join(directory, name, COMPLETE_MARKER))]
    if jax.process_index() == 0:
        for step in unfinished:
            set_aside(directory, step, f"was never finished (no {COMPLETE_MARKER}), so it "
                      "could not be saved again")
    _sync("set_aside_unfinished")
    return unfinished


# Longest error text quoted in the one-line warning about a damaged step.
_MAX_ERROR_CHARS = 200


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # tensorstore appends a dump of its whole spec to the message.
    text = (lines[0] if lines else "").split(" See full TensorStore details")[0]
    if len(text) > _MAX_ERROR_CHARS:
        text = text[:_MAX_ERROR_CHARS] + "..."
    return f"{type(error).__name__}: {text}"


def _is_late_read_of_a_failed_restore(unraisable) -> bool:
    value, source = unraisable.exc_value, unraisable.object
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
        return True
    # An orbax read coroutine that failed after its restore had already given up.
    code = getattr(source, "cr_code", None)
    return inspect.iscoroutine(source) and code is not None and "orbax" in code.co_filename


# How asyncio reports a task or future whose error nobody took.
_NEVER_RETRIEVED = ("Task exception was never retrieved",
                    "Future exception was never retrieved")
# How a failed read is worded: tensorstore's own error (a future without a traceback) and
# orbax's wrapping of it (a task whose traceback runs through orbax's files).
_READ_ERROR_WORDS = ("error reading", "error while reading")
_READER_PACKAGES = ("orbax", "tensorstore")


def _is_read_error(error: BaseException) -> bool:
    text = str(error).lower()
    if any(words in text for words in _READ_ERROR_WORDS):
        return True
    frames = traceback.extract_tb(error.__traceback__)
    return any(package in frame.filename for frame in frames for package in _READER_PACKAGES)


class _AbandonedReadRecordsDropped(logging_lib.Filter):
    """Drops asyncio's log records about a failed restore's abandoned reads."""

    def filter(self, record: logging_lib.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        abandoned_read = (str(record.msg).startswith(_NEVER_RETRIEVED) and error is not None
                          and _is_read_error(error))
        return not abandoned_read


_ABANDONED_READ_RECORDS = _AbandonedReadRecordsDropped()


class LateReadsOfFailedRestoresIgnored:
    """Silences the reads a failed restore leaves in flight: while it is entered, and for
    the rest of the process once a restore under it failed.

    When one array of a step fails to read, orbax's restore raises and closes its event
    loop while tensorstore still completes the step's other reads, whenever it gets to
    them (seconds later on a busy machine): each completion then finds the loop closed
    ("RuntimeError: Event loop is closed", through sys.unraisablehook), and the reads
    that failed too are collected with nobody to take their error (orbax coroutines
    through sys.unraisablehook, asyncio tasks and futures through asyncio's logger). Only
    these kinds are dropped; every other report goes through as before. Set `failed` when
    a restore attempted under it failed: the filters then stay, since the late reads may
    arrive at any time after; otherwise the previous hook is back on exit (unless something
    else replaced the filter meanwhile).
    """

    def __enter__(self) -> LateReadsOfFailedRestoresIgnored:
        self.failed = False  # set by the caller when a restore failed
        self._previous = previous = sys.unraisablehook

        def hook(unraisable):
            if not _is_late_read_of_a_failed_restore(unraisable):
                previous(unraisable)

        self._hook = hook
        sys.unraisablehook = hook
        logging_lib.getLogger("asyncio").addFilter(_ABANDONED_READ_RECORDS)
        return self

    def __exit__(self, *exc_info) -> None:
        if self.failed:
            # The reads a failed restore abandoned are collected now rather than at some
            # later collection; those still in flight arrive later, still filtered.
            gc.collect()
            return
        logging_lib.getLogger("asyncio").removeFilter(_ABANDONED_READ_RECORDS)
        if sys.unraisablehook is self._hook:
            sys.unraisablehook = self._previous


def all_processes(ok: bool) -> bool:
    """True if `ok` holds on every process (a step one process cannot read is damaged
    for all: they must resume from the same step).

    Args:
      ok: this process's outcome.

    Returns:
      Whether every process's outcome is True (the same answer on all of them).
    """
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def newest_that_restores(
    manager: ocp.CheckpointManager, restore: Callable[[int], T]
) -> tuple[int, T] | None:
    """Restores the newest finished step that restores, moving aside each newer one that
    fails.

    Args:
      manager: the run's checkpoint manager.
      restore: reads one step; raises ConfigError if the step does not fit the run, and
        anything else if its files are damaged.

    Returns:
      (step, what `restore` returned), or None when the run has no checkpoint.

    Raises:
      ConfigError: a step does not fit the run (the first process's sentence, on every
        process); nothing is moved.
      ValueError: when checkpoints exist but none restores (all were moved aside).
    """
    directory = str(manager.directory)
    steps = complete_steps(manager)
    if not steps:
        return None
    # Around the attempts only: a failing read closes orbax's event loop before it raises.
    with LateReadsOfFailedRestoresIgnored() as late_reads:
        for step in reversed(steps):
            error: BaseException | None = None
            mismatch = ""
            try:
                restored: Any = restore(step)
            except ConfigError as caught:  # the step is sound: this run cannot continue it
                mismatch = str(caught)
            except Exception as caught:  # any other failure to read a step: damage
                error = caught
            # Every process stops on a mismatch that any of them found.
            mismatch = parallel.first_failure(f"resume.{step}", mismatch)
            if mismatch:
                raise ConfigError(mismatch)
            if all_processes(error is None):
                return step, restored
            late_reads.failed = True
            if jax.process_index() == 0:
                why = (f"does not restore "
                       f"({_first_line(error) if error else 'on another process'})")
                set_aside(directory, step, why)
            _sync(f"newest_that_restores.{step}")
            manager.reload()
    raise ValueError(
        f"No checkpoint in {directory} restores; all were moved to "
        f"{damaged_dir(directory)}. Rerun to start from scratch, or pass another --workdir.")
