"""Stopping a training run cleanly on SIGTERM (preemption) or Ctrl-C.

The loop asks after every step whether to stop; it then saves and exits with status 0, so
rerunning the same command resumes where the run stopped.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import jax
from absl import logging
from jax.experimental import multihost_utils

# The shell's convention for a process ended by SIGINT (128 + 2).
INTERRUPTED_EXIT_STATUS = 130


def _stop_now() -> None:
    """A second Ctrl-C: exit at once and quietly, saving nothing.

    os._exit rather than KeyboardInterrupt: unwinding would print a traceback and wait for
    a checkpoint being written and for wandb, which is what the user declined. What is left
    is safe: a half-written checkpoint is never resumed from, the workdir lock is the
    kernel's, and the data workers exit when they see this process gone.
    """
    print("Ctrl-C again: stopped without saving.", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(INTERRUPTED_EXIT_STATUS)


class StopSignals:
    """Notices SIGTERM (preemption) or Ctrl-C so the loop can finish its step, save and exit.

    One process: signal handlers set a flag; a second Ctrl-C exits at once with status
    130, without saving. Several processes: they must stop at the same step, or the
    collective save would hang; jax's preemption service (started by jax.distributed, which
    catches SIGTERM itself) propagates the notice to every process and names a common
    step, without blocking the steps in between.
    """

    def __init__(self):
        self._distributed = jax.process_count() > 1
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        if not self._distributed:
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        del frame
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            _stop_now()
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
