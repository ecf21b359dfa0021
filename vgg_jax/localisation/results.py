"""Localisation results: rows, the paper's Tables 8-10 beside them, and loc_results.json.

A row is one protocol of one box net (or the union of several: the paper's fusion) at
its test scales. Rows are matched to the paper's figures on their fields (net D, 1000
classes, the head, the layers fine-tuned, training and test scales), never on labels;
the paper's three tables are also printed whole after ours, since most of our settings
(the digits, a narrow net) have no figure of the paper's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from vgg_jax.evaluation.results import format_table, scale_label
from vgg_jax.localisation.protocols import CENTRAL_CROP, DENSE, PAPER_NUMBERS
from vgg_jax.models import PER_CLASS, SINGLE_CLASS

RESULTS_BASENAME = "loc_results"
HISTORY_FILENAME = "loc_history.jsonl"
# The paper's figures are ILSVRC's (1000 classes) with net D.
_PAPER_CLASSES, _PAPER_VERSION = 1000, "D"
ALL_LAYERS, FC_LAYERS = "all layers", "fc6-fc8"
# Table 8 (validation, S = 384, central crop, the ground-truth class):
# (head, layers fine-tuned) -> localisation error %. The paper's "fc6-fc7" fine-tuned
# fc6 and fc7 with the new fc8, the convolutional layers kept fixed.
TABLE_8 = {(SINGLE_CLASS, FC_LAYERS): 36.4, (PER_CLASS, FC_LAYERS): 34.3,
           (PER_CLASS, ALL_LAYERS): 33.1}
# Table 9 (validation, dense, top-5): (train S of each net, test Q) -> error %; the fusion
# of the S = 256 and S = 384 nets at any Q.
TABLE_9 = {((256,), (256,)): 29.5, ((384,), (384,)): 28.2, ((384,), (352, 384)): 27.5}
TABLE_9_FUSION = 26.9
# The paper's reference rows, printed after ours: (table, setting, split, error %).
PAPER_ROWS = (
    ("Table 8", "S=384, central crop, GT class: fc6-fc7 + SCR", "val", 36.4),
    ("Table 8", "S=384, central crop, GT class: fc6-fc7 + PCR", "val", 34.3),
    ("Table 8", "S=384, central crop, GT class: all layers + PCR", "val", 33.1),
    ("Table 9", "dense, top-5, train S 256 / test Q 256", "val", 29.5),
    ("Table 9", "dense, top-5, 384 / 384", "val", 28.2),
    ("Table 9", "dense, top-5, 384 / 384", "test", 26.7),
    ("Table 9", "dense, top-5, 384 / {352, 384}", "val", 27.5),
    ("Table 9", "dense, top-5, fusion of the 256 and 384 nets", "val", 26.9),
    ("Table 9", "dense, top-5, fusion of the 256 and 384 nets", "test", 25.3),
    ("Table 10", "VGG (this paper)", "test", 25.3),
    ("Table 10", "GoogLeNet", "test", 26.7),
    ("Table 10", "OverFeat", "test", 29.9),
    ("Table 10", "Krizhevsky et al.", "test", 34.2),
)


@dataclasses.dataclass(frozen=True)
class Row:
    """One localisation result.

    Attributes:
      protocol: CENTRAL_CROP (the paper's protocol 1) or DENSE (protocol 2).
      nets: the box nets' names (several: their boxes united).
      versions: each net's configuration ("A" ... "E").
      regressions: each net's head (PER_CLASS or SINGLE_CLASS).
      fine_tuned: each net's trained layers, ALL_LAYERS or the trained ones.
      train_scales: each net's training scale (S_min, S_max).
      test_scales: the test scales Q.
      classes: the data set's classes.
      classifier: the net ranking the classes (protocol 2), else "".
      localisation_error: in percent (nan without images).
      images: images counted.
    """

    protocol: str
    nets: tuple[str, ...]
    versions: tuple[str, ...]
    regressions: tuple[str, ...]
    fine_tuned: tuple[str, ...]
    train_scales: tuple[tuple[int, int], ...]
    test_scales: tuple[int, ...]
    classes: int
    classifier: str
    localisation_error: float
    images: int

    def to_json(self) -> dict[str, Any]:
        return dict(dataclasses.asdict(self), paper_protocol=PAPER_NUMBERS[self.protocol],
                    paper=paper_figure(self))


def paper_figure(row: Row) -> dict[str, Any] | None:
    """The paper's figure for a row's setting, if the paper reports it.

    Args:
      row: a result row.

    Returns:
      {"table", "localisation_error"}, or None (another net, data set or setting).
    """
    if row.classes != _PAPER_CLASSES or set(row.versions) != {_PAPER_VERSION}:
        return None
    fixed = [lo for lo, hi in row.train_scales if lo == hi]
    if len(fixed) != len(row.train_scales):
        return None
    if row.protocol == CENTRAL_CROP and fixed == [384]:
        figure = TABLE_8.get((row.regressions[0], row.fine_tuned[0]))
        return {"table": "Table 8", "localisation_error": figure} if figure else None
    if row.protocol != DENSE or set(row.regressions) != {PER_CLASS}:
        return None
    if sorted(fixed) == [256, 384]:
        return {"table": "Table 9 (fusion)", "localisation_error": TABLE_9_FUSION}
    figure = TABLE_9.get((tuple(fixed), tuple(sorted(row.test_scales))))
    return {"table": "Table 9", "localisation_error": figure} if figure else None


def _paper_cell(row: Row) -> str:
    figure = paper_figure(row)
    return "-" if figure is None else f"{figure['localisation_error']:.1f} ({figure['table']})"


ROW_COLUMNS = (
    ("protocol", lambda r: f"{PAPER_NUMBERS[r.protocol]}: {r.protocol}"),
    ("box net", lambda r: " + ".join(r.nets)),
    ("head", lambda r: ", ".join(r.regressions)),
    ("fine-tuned", lambda r: ", ".join(r.fine_tuned)),
    ("train S", lambda r: ", ".join(scale_label(s) for s in r.train_scales)),
    ("test Q", lambda r: ",".join(str(q) for q in r.test_scales)),
    ("classes ranked by", lambda r: r.classifier or "- (ground truth)"),
    ("loc. error (%)", lambda r: f"{r.localisation_error:.2f}"),
    ("images", lambda r: str(r.images)),
    ("paper (%)", _paper_cell),
)
PAPER_COLUMNS = (("table", lambda p: p[0]), ("the paper's setting (net D)", lambda p: p[1]),
                 ("split", lambda p: p[2]), ("loc. error (%)", lambda p: f"{p[3]:.1f}"))


def format_results(rows: Sequence[Row]) -> str:
    """Our rows, then the paper's Tables 8-10, as Markdown tables."""
    return (format_table(rows, ROW_COLUMNS) + "\n\nThe paper (ILSVRC-2012 validation, "
            "ILSVRC-2014 test; Appendix A):\n\n" + format_table(PAPER_ROWS, PAPER_COLUMNS))


def write_results(workdir: str, rows: Sequence[Row], extra: Mapping[str, Any]) -> str:
    """Writes loc_results.json and .md (the newest evaluation) and appends the history.

    Args:
      workdir: the box net's run directory.
      rows: the result rows.
      extra: more fields to record (split, checkpoints, classifier rows, faults).

    Returns:
      The path of loc_results.json.
    """
    os.makedirs(workdir, exist_ok=True)
    payload = {"rows": [row.to_json() for row in rows],
               "paper": [dict(zip(("table", "setting", "split", "localisation_error"), p))
                         for p in PAPER_ROWS],
               **extra, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    path = os.path.join(workdir, RESULTS_BASENAME + ".json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    with open(os.path.join(workdir, HISTORY_FILENAME), "a") as f:
        f.write(json.dumps(payload) + "\n")
    with open(os.path.join(workdir, RESULTS_BASENAME + ".md"), "w") as f:
        f.write(format_results(rows) + "\n")
        for key, value in extra.items():
            f.write(f"\n{key}: {value}")
        f.write("\n")
    return path
