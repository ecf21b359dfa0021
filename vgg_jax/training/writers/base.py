"""The metrics interface of training: every writer takes the same calls, and the loop
calls them whatever the backends are (console, JSON lines, wandb; `vgg_jax.training.writers`
builds the set)."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, Self

import numpy as np


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
