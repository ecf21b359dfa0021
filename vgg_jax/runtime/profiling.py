"""A device profile of a few training steps (jax.profiler), for speed work on a GPU.

The trace holds every kernel the steps ran, with its time: which convolution algorithm
cuDNN picked, how long FC6's 7x7 convolution takes, whether the host kept the device busy.
"""

from __future__ import annotations

import os

import jax
from absl import logging

PROFILE_SUBDIR = "profile"


class StepProfiler:
    """Traces steps [first_step, first_step + num_steps) of a run into <workdir>/profile.

    Call `before_step(step)` before dispatching step `step` (1-based, the step the state
    will have after it) and `after_step(step, outputs)` after; `close()` ends a trace that
    a stop cut short. Does nothing when first_step < 0 or the run resumed past it.
    """

    def __init__(self, workdir: str, first_step: int, num_steps: int):
        """Args:
        workdir: the run's directory; the trace goes to its profile/ subdirectory.
        first_step: the first traced step, or a negative number for no profile.
        num_steps: how many steps to trace.
        """
        self.directory = os.path.join(workdir, PROFILE_SUBDIR)
        self.first_step = int(first_step)
        self.last_step = self.first_step + max(int(num_steps), 1) - 1
        self._active = False

    def before_step(self, step: int) -> None:
        """Starts the trace before the first profiled step.

        Args:
          step: the step about to run.
        """
        if self.first_step >= 0 and step == self.first_step and not self._active:
            jax.profiler.start_trace(self.directory)
            self._active = True

    def after_step(self, step: int, outputs) -> None:
        """Ends the trace once the last profiled step has finished on the device.

        Args:
          step: the step just dispatched.
          outputs: its outputs, waited for so the trace holds the whole step.
        """
        if self._active and step >= self.last_step:
            jax.block_until_ready(outputs)
            self.close()
            logging.info("Device profile of steps %d-%d written to %s (open it with xprof "
                         "or TensorBoard's profile plugin).", self.first_step, step,
                         self.directory)

    def close(self) -> None:
        """Stops a trace still running (a run stopped inside the profiled steps)."""
        if self._active:
            jax.profiler.stop_trace()
            self._active = False
