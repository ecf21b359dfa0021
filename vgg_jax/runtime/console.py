"""The terminal: whether a stream is one, and log records kept above a progress bar."""

from __future__ import annotations

import functools
import logging

import tqdm


class LogRecordsAboveBar:
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
