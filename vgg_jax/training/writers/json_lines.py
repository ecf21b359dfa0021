"""The JSON-lines writer: `<workdir>/metrics.jsonl`, one object per write, and its reader."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from vgg_jax.metric_names import STEP
from vgg_jax.training.writers.base import MetricWriter

METRICS_FILENAME = "metrics.jsonl"


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
