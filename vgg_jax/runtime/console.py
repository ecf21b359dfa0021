"""The terminal: whether a stream is one, log records kept above a progress bar, and the
libraries' log lines kept out of a command's answer."""

from __future__ import annotations

import logging

import tqdm
from absl import logging as absl_logging

# Libraries whose INFO lines (one per checkpoint phase, per compilation) would bury a
# command's own output; their warnings and errors still show.
_CHATTY_LIBRARIES = ("/orbax/", "/grain/", "/jax/", "/jaxlib/", "/flax/")
# orbax warnings about what evaluation, prediction and conversion do on purpose: they open
# checkpoints read only (never cleaning up a running job's directory) and restore the
# parameters alone.
_EXPECTED_ORBAX_WARNINGS = (
    "read_only=True", "Given directory is read only", "was found in the checkpoint, but could "
    "not be restored")


def _ours_or_worth_seeing(record: logging.LogRecord) -> bool:
    """Every warning but orbax's expected ones; INFO lines only from our own code (more
    with --verbosity=1 and up)."""
    if absl_logging.get_verbosity() > absl_logging.INFO:
        return True
    if record.levelno >= logging.WARNING:
        return not ("/orbax/" in record.pathname and any(
            text in record.getMessage() for text in _EXPECTED_ORBAX_WARNINGS))
    return not any(part in record.pathname for part in _CHATTY_LIBRARIES)


def quiet_library_logs() -> None:
    """Keeps the libraries' INFO lines and orbax's expected warnings out of absl's log, so
    that a command's answer is not buried under dozens of checkpoint-phase lines; warnings
    and errors still show, and --verbosity=1 shows everything. Call once, in a command's
    main, after absl has parsed its flags."""
    absl_logging.get_absl_handler().addFilter(_ours_or_worth_seeing)


class _AboveBarHandler(logging.Handler):
    """Hands each record to the handler it stands in for, with the bars on `stream`
    cleared before and redrawn after."""

    def __init__(self, target: logging.Handler, stream):
        super().__init__(target.level)
        self.target, self._stream = target, stream

    def handle(self, record: logging.LogRecord) -> bool:
        # The target applies its own level and filters (absl's handler hands records on
        # from `handle`, so `emit` alone would bypass it).
        with tqdm.tqdm.external_write_mode(file=self._stream):
            return self.target.handle(record)


class LogRecordsAboveBar:
    """While installed, the root logger's handlers (absl's among them) write each record on
    a line of its own above the progress bars on `stream`, which are redrawn below it.

    The bar's frames end without a newline, so a log line written while the bar is shown
    (a warning from a library, a checkpoint message) would otherwise continue the bar's
    line. tqdm's own `logging_redirect_tqdm` only swaps plain StreamHandlers, and absl's
    handler is not one, so every handler is swapped for one that hands it the record.
    """

    def __init__(self, stream, logger: logging.Logger | None = None):
        self._logger = logger or logging.getLogger()
        self._swapped = []
        for handler in list(self._logger.handlers):
            stand_in = _AboveBarHandler(handler, stream)
            self._logger.removeHandler(handler)
            self._logger.addHandler(stand_in)
            self._swapped.append(stand_in)

    def remove(self) -> None:
        """Puts the original handlers back (a stand-in removed meanwhile stays removed)."""
        for stand_in in self._swapped:
            if stand_in in self._logger.handlers:
                self._logger.removeHandler(stand_in)
                self._logger.addHandler(stand_in.target)
        self._swapped = []


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
