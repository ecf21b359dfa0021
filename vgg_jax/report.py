"""Our evaluations next to the paper's Tables 3-6, gathered from several runs.

  python -m vgg_jax.report runs/vgg_a runs/vgg_b runs/vgg_d_jitter runs/vgg_e_jitter \
      --out report.md

Reads every evaluation a workdir has recorded (`<workdir>/eval_history.jsonl`, appended by
`main.py --mode=eval`), keeps the newest result of each setting (net, training scale, test
scales, protocol), and prints one Markdown table: the paper's tables' rows first, in the
paper's order, then the settings the paper does not report.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from vgg_jax import eval_results, paper_results

# Report columns after the evaluation table's own: where each row comes from.
SOURCE_COLUMNS = (("workdir", "workdir"), ("steps", "steps"), ("date", "evaluated"))
_TABLE_ORDER = ("Table 3", "Table 4", "Table 5", "Table 6")


def read_history(workdir: str) -> list[dict[str, Any]]:
    """Every evaluation row a workdir recorded, each with its workdir, steps and date.

    Args:
      workdir: a run directory evaluated with `main.py --mode=eval`.

    Returns:
      The rows in the order they were evaluated.

    Raises:
      FileNotFoundError: if the workdir holds no evaluation history.
    """
    path = os.path.join(workdir, eval_results.HISTORY_FILENAME)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist; evaluate the run first (python main.py --mode=eval "
            f"--workdir={workdir} with its --config).")
    rows = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            entry = json.loads(line)
            for row in entry["rows"]:
                rows.append(dict(row, workdir=workdir, steps=entry.get("steps"),
                                 date=entry.get("date")))
    return rows


def newest_per_setting(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keeps the last row of each (net, train S, test Q, protocol), in first-seen order.

    Args:
      rows: rows in evaluation order (later ones replace earlier ones).

    Returns:
      One row per setting.
    """
    newest: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        newest[(row["net"], row["train_S"], row["test_Q"], row["protocol"])] = row
    return list(newest.values())


def build_report(workdirs: Sequence[str]) -> str:
    """The Markdown report of the workdirs' newest evaluations against the paper.

    Args:
      workdirs: run directories with an evaluation history.

    Returns:
      A Markdown table (paper rows first, in table order) with a one-line header.
    """
    rows = newest_per_setting([row for w in workdirs for row in read_history(w)])
    compared = paper_results.compare(rows)

    def order(row):
        table = row["paper_table"]
        return (_TABLE_ORDER.index(table) if table in _TABLE_ORDER else len(_TABLE_ORDER),)

    compared.sort(key=order)  # stable: evaluation order within a table
    matched = sum(row["paper_table"] is not None for row in compared)
    header = (f"{len(compared)} settings evaluated, {matched} with a figure in the paper "
              "(top-1 / top-5 validation error, %).")
    # The rows are compared already: the paper's columns come as plain extra columns.
    table = eval_results.format_table(
        compared, with_paper=False,
        extra_columns=eval_results.PAPER_COLUMNS + SOURCE_COLUMNS)
    return header + "\n\n" + table


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: prints (and optionally writes) the report; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdirs", nargs="+", help="run directories evaluated with --mode=eval")
    parser.add_argument("--out", help="also write the report to this Markdown file")
    args = parser.parse_args(argv)
    try:
        report = build_report(args.workdirs)
    except (FileNotFoundError, json.JSONDecodeError, KeyError) as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
