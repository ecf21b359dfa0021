"""Stopping a training run cleanly on SIGTERM (preemption) or Ctrl-C.

The loop asks after every step whether to stop; it then saves and exits with status 0, so
rerunning the same command resumes where the run stopped.
"""

from __future__ import annotations

import contextlib
import multiprocessing.util
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import jax
from absl import logging
from jax.experimental import multihost_utils

# The shell's convention for a process ended by SIGINT (128 + 2).
INTERRUPTED_EXIT_STATUS = 130
# How long a second Ctrl-C waits for the data workers to stop and for multiprocessing to
# free what they shared, before it exits anyway.
_RELEASE_TIMEOUT_S = 5.0


def _stop_now(release: Callable[[], None] | None) -> None:
    """A second Ctrl-C: exit at once and quietly, saving nothing.

    os._exit rather than KeyboardInterrupt: unwinding would print a traceback and wait for
    a checkpoint being written and for wandb, which is what the user declined. What is left
    is safe: a half-written checkpoint is never resumed from, and the workdir lock is the
    kernel's. Before it, for at most `_RELEASE_TIMEOUT_S`: `release` (the loop stops its
    data workers, which frees the batches they hold in shared memory), then what
    multiprocessing itself runs at a normal exit, its finalizers (the semaphores of the
    workers' queues are unlinked). Otherwise the resource tracker would free them after
    this process, reporting each as leaked; past the timeout it still does.
    """
    print("Ctrl-C again: stopped without saving.", file=sys.stderr, flush=True)
    sys.stdout.flush()
    releasing = threading.Thread(target=_release, args=(release,), daemon=True)
    releasing.start()
    releasing.join(_RELEASE_TIMEOUT_S)
    os._exit(INTERRUPTED_EXIT_STATUS)


def _release(release: Callable[[], None] | None) -> None:
    with contextlib.suppress(Exception):  # exiting anyway: a failed release changes nothing
        if release is not None:
            release()
        # multiprocessing's own exit-time clean-up (`util._exit_function` runs exactly this
        # first); no public name reaches it, and os._exit skips it.
        multiprocessing.util._run_finalizers(0)


class StopSignals:
    """Notices SIGTERM (preemption) or Ctrl-C so the loop can finish its step, save and exit.

    One process: signal handlers set a flag; a second Ctrl-C exits at once with status
    130, without saving (after `release`, at most a few seconds). Several processes: they
    must stop at the same step, or the collective save would hang; jax's preemption service
    (started by jax.distributed, which catches SIGTERM itself) propagates the notice to
    every process and names a common step, without blocking the steps in between.

    Args:
      release: what a second Ctrl-C runs before it exits (e.g. stopping the data workers).
    """

    def __init__(self, release: Callable[[], None] | None = None):
        self._distributed = jax.process_count() > 1
        self._release = release
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        if not self._distributed:
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        del frame
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            _stop_now(self._release)
        self.signal_name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            print("\nCtrl-C: saving after this step (press it again to stop without saving).",
                  file=sys.stderr, flush=True)

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step`; every process calls it at every step.

        Args:
          step: the step just dispatched.

        Returns:
          True once a stop was asked for (on several processes: at the common step).
        """
        if self._distributed:
            if multihost_utils.reached_preemption_sync_point(step):
                self.signal_name = "SIGTERM"
                logging.warning("Preemption notice: every process stops at step %d.", step)
                return True
            return False
        return self.signal_name is not None

    def restore(self) -> None:
        """Puts back the signal handlers that were there before."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
