"""Our evaluations next to the paper's Tables 3-6, gathered from several runs.

  python -m vgg_jax.evaluation.report --workdir=runs/vgg_a --workdir=runs/vgg_d \
      --workdir=runs/vgg_d_jitter --out=report.md [--json=report.json]

Reads every evaluation a workdir has recorded (`<workdir>/eval_history.jsonl`, appended by
`main.py --mode=eval`), keeps the newest result of each setting (nets, training scales,
test scales, protocol), and prints one Markdown table: the paper's tables' rows first, in
the paper's order, then the settings the paper does not report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence

from absl import app, flags

from vgg_jax.evaluation import paper, results


@dataclasses.dataclass(frozen=True)
class Recorded:
    """A result row with where it comes from."""

    row: results.Row
    workdir: str
    steps: tuple
    date: str


# The results table's columns, the paper's, then where each row comes from.
COLUMNS = tuple((title, lambda r, cell=cell: cell(r.row))
                for title, cell in results.ROW_COLUMNS + results.PAPER_COLUMNS) + (
    ("workdir", lambda r: r.workdir),
    ("steps", lambda r: ",".join(str(s) for s in r.steps)),
    ("evaluated", lambda r: r.date or "-"),
)


def read_history(workdir: str) -> list[Recorded]:
    """Every evaluation row a workdir recorded, in the order they were evaluated.

    Args:
      workdir: a run directory evaluated with `main.py --mode=eval`.

    Returns:
      The rows with their workdir, checkpoint steps and date.

    Raises:
      FileNotFoundError: if the workdir holds no evaluation history.
      ValueError: for a history written in another format.
    """
    path = os.path.join(workdir, results.HISTORY_FILENAME)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist; evaluate the run first (python main.py --mode=eval "
            f"--workdir={workdir} with its --config).")
    recorded = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            entry = json.loads(line)
            try:
                rows = [results.Row.from_json(row) for row in entry["rows"]]
            except KeyError as error:
                raise ValueError(
                    f"{path} line {number} lacks the field {error}: it was written by an "
                    "older version; evaluate the run again to record it.") from None
            recorded += [Recorded(row, workdir, tuple(entry.get("steps") or ()),
                                  entry.get("date", "")) for row in rows]
    return recorded


def newest_per_setting(recorded: Sequence[Recorded]) -> list[Recorded]:
    """Keeps the last row of each setting, in first-seen order.

    Args:
      recorded: rows in evaluation order (later ones replace earlier ones).

    Returns:
      One row per setting.
    """
    newest: dict[tuple, Recorded] = {}
    for entry in recorded:
        newest[entry.row.setting()] = entry
    return list(newest.values())


def gather(workdirs: Sequence[str]) -> list[Recorded]:
    """The workdirs' newest rows, the paper's tables' first (table order, then run order)."""
    recorded = newest_per_setting([r for w in workdirs for r in read_history(w)])
    return sorted(recorded, key=lambda r: paper.table_rank(paper.paper_result(r.row)))


def build_report(workdirs: Sequence[str]) -> str:
    """The Markdown report of the workdirs' newest evaluations against the paper.

    Args:
      workdirs: run directories with an evaluation history.

    Returns:
      A one-line header and a Markdown table (paper rows first, in table order).
    """
    recorded = gather(workdirs)
    matched = sum(paper.paper_result(r.row) is not None for r in recorded)
    header = (f"{len(recorded)} settings evaluated, {matched} with a figure in the paper "
              "(top-1 / top-5 validation error, %).")
    return header + "\n\n" + results.format_table(recorded, COLUMNS)


def to_json(recorded: Sequence[Recorded]) -> list[dict]:
    """The rows, each with its source and the paper's figure (None where it has none)."""
    out = []
    for r in recorded:
        match = paper.paper_result(r.row)
        out.append({**r.row.to_json(), "workdir": r.workdir, "steps": list(r.steps),
                    "date": r.date, "paper": match._asdict() if match else None})
    return out


def define_flags() -> None:
    """The command's flags (defined when run, so that importing this module defines none)."""
    flags.DEFINE_multi_string(
        "workdir", [], "A run directory evaluated with main.py --mode=eval (repeat for several).")
    flags.DEFINE_string("out", None, "Also write the report to this Markdown file.")
    flags.DEFINE_string("json", None, "Also write the reported rows to this JSON file.")


def main(argv: Sequence[str]) -> None:
    """Prints the report (and writes --out, --json); exits 1 with one line on bad input."""
    workdirs = flags.FLAGS.workdir
    if len(argv) > 1:
        sys.exit(f"Unexpected arguments {' '.join(argv[1:])}; pass each run directory as "
                 "--workdir=DIR.")
    if not workdirs:
        sys.exit("Pass at least one --workdir=DIR evaluated with main.py --mode=eval.")
    try:
        recorded = gather(workdirs)
        report = build_report(workdirs)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"Error: {error}")
    print(report)
    if flags.FLAGS.out:
        with open(flags.FLAGS.out, "w") as f:
            f.write(report + "\n")
    if flags.FLAGS.json:
        with open(flags.FLAGS.json, "w") as f:
            json.dump(to_json(recorded), f, indent=1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
