"""Stopping a training run cleanly on SIGTERM (preemption) or Ctrl-C.

The loop asks after every step whether to stop; it then saves and exits with status 0, so
rerunning the same command resumes where the run stopped.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

import jax
from jax.experimental import multihost_utils


class StopSignals:
    """Notices SIGTERM (preemption) or Ctrl-C so the loop can finish its step, save and exit.

    One process: signal handlers set a flag; a second Ctrl-C interrupts at once, without
    saving. Several processes: they must stop at the same step, or the collective save
    would hang; jax's preemption service (started by jax.distributed, which catches
    SIGTERM itself) propagates the notice to every process and names a common step,
    without blocking the steps in between.
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
        self.signal_name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            # The next Ctrl-C gets Python's default: an immediate KeyboardInterrupt.
            signal.signal(signal.SIGINT, self._previous.pop(signal.SIGINT))
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
                return True
            return False
        return self.signal_name is not None

    def restore(self) -> None:
        """Puts back the signal handlers that were there before."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
