"""A benchmark's JSON file, rewritten the moment each figure exists.

A benchmark part may be killed by its time budget; what it measured before must already
be on disk. So every figure is written as soon as it is known: the file is replaced
whole (written beside it, then renamed, so that a kill mid-write leaves the previous
version, never half a file), and a line `wrote PATH (WHAT)` says what it now holds.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

# The file written beside the JSON before it is renamed over it.
TEMP_SUFFIX = ".partial"
# The line printed after each write (run_all.py reads it to record when figures landed).
WROTE_PREFIX = "wrote "


def _print_now(line: str) -> None:
    print(line, flush=True)


class JsonOut:
    """The figures of one benchmark process and the file they are written to.

    Args:
      path: the JSON file; None = keep the figures in memory only.
      figures: what the file starts with (the header: command, date, ...).
      extra: called at every write for more entries (e.g. the compilations so far).
      say: where the `wrote` line goes (None: printed and flushed at once).
    """

    def __init__(self, path: str | None, figures: dict[str, Any] | None = None,
                 extra: Callable[[], dict[str, Any]] | None = None,
                 say: Callable[[str], None] | None = None):
        self.path = path
        self.figures: dict[str, Any] = dict(figures or {})
        self.extra = extra
        self._say = say or _print_now

    def add(self, key: str, value: Any, what: str) -> None:
        """Sets `key` and writes the file at once.

        Args:
          key: the top-level entry.
          value: its figures (JSON-serialisable).
          what: the words after the path in the `wrote` line.
        """
        self.figures[key] = value
        self.write(what)

    def write(self, what: str) -> None:
        """Writes every figure so far (nothing without a path)."""
        if not self.path:
            return
        data = {**self.figures, **(self.extra() if self.extra else {})}
        temp = self.path + TEMP_SUFFIX
        with open(temp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(temp, self.path)
        self._say(f"{WROTE_PREFIX}{self.path} ({what})")
