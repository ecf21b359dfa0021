"""What an evaluation reports: result rows, the accumulator that counts them, the table, files.

A result row is a frozen dataclass of numbers and names; its labels ("[256;512]",
"256,384,512") exist only when a table is printed. `Accumulator` gathers one evaluation:
each pass's metric sums (computed on the device, already global over processes) and, when
rows combine passes (several scales, components or nets), this process's softmax outputs,
from which the combined rows are scored with the same metrics. eval_results.json and
eval_results.md hold the newest evaluation of a workdir, eval_history.jsonl all of them
(vgg_jax.evaluation.report reads it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from vgg_jax.evaluation import metrics, paper
from vgg_jax.evaluation.protocols import Protocol
from vgg_jax.runtime import parallel

RESULTS_BASENAME = "eval_results"
HISTORY_FILENAME = "eval_history.jsonl"


@dataclasses.dataclass(frozen=True)
class Row:
    """One result: a net (or an ensemble) under one protocol at one set of test scales.

    Attributes:
      nets: the net names (several for an ensemble).
      versions: the paper's configuration of each net ("A" ... "E", "A_LRN"; "" unknown).
      train_scales: each net's training scale (S_min, S_max).
      test_scales: the test scales Q whose softmax outputs were averaged.
      protocol: a component ("dense", ...) or the combined protocol.
      top1_error, top5_error: in percent (nan without images).
      images: images counted (undecodable ones are not).
    """

    nets: tuple[str, ...]
    versions: tuple[str, ...]
    train_scales: tuple[tuple[int, int], ...]
    test_scales: tuple[int, ...]
    protocol: str
    top1_error: float
    top5_error: float
    images: int

    def setting(self) -> tuple:
        """What identifies the setting (a newer row of the same setting replaces it)."""
        return self.nets, self.train_scales, self.test_scales, self.protocol

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Row:
        """A row from `to_json`'s dict (lists back to tuples)."""
        return cls(
            nets=tuple(data["nets"]), versions=tuple(data["versions"]),
            train_scales=tuple((int(lo), int(hi)) for lo, hi in data["train_scales"]),
            test_scales=tuple(int(q) for q in data["test_scales"]), protocol=data["protocol"],
            top1_error=float(data["top1_error"]), top5_error=float(data["top5_error"]),
            images=int(data["images"]))


def scale_label(train_scale: tuple[int, int]) -> str:
    """A training scale as the paper writes it: "256" or "[256;512]"."""
    lo, hi = train_scale
    return str(lo) if lo == hi else f"[{lo};{hi}]"


def _error(value: float | None, decimals: int) -> str:
    return "-" if value is None else f"{value:.{decimals}f}"


# (title, cell of a row) of the results table, in the paper's terms.
ROW_COLUMNS: tuple[tuple[str, Callable[[Row], str]], ...] = (
    ("net", lambda r: " + ".join(r.nets)),
    ("train S", lambda r: ", ".join(scale_label(s) for s in r.train_scales)),
    ("test Q", lambda r: ",".join(str(q) for q in r.test_scales)),
    ("protocol", lambda r: r.protocol),
    ("top-1 err (%)", lambda r: _error(r.top1_error, 2)),
    ("top-5 err (%)", lambda r: _error(r.top5_error, 2)),
    ("images", lambda r: str(r.images)),
)


def _paper_cell(field: str, decimals: int | None = None) -> Callable[[Row], str]:
    def cell(row: Row) -> str:
        result = paper.paper_result(row)
        if result is None:
            return "-"
        value = getattr(result, field)
        return value if decimals is None else _error(value, decimals)  # the paper: 1 decimal

    return cell


PAPER_COLUMNS = (("paper", _paper_cell("table")), ("paper top-1 (%)", _paper_cell("top1_error", 1)),
                 ("paper top-5 (%)", _paper_cell("top5_error", 1)))


def format_table(items: Sequence[Any], columns: Sequence[tuple[str, Callable[[Any], str]]]
                 = ROW_COLUMNS + PAPER_COLUMNS) -> str:
    """A Markdown table, one line per item.

    Args:
      items: the rows (Row objects, or anything the columns' cell functions take).
      columns: (title, cell function) pairs; default the results with the paper's figures.

    Returns:
      The table's lines joined by newlines.
    """
    lines = ["| " + " | ".join(title for title, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(item) for _, cell in columns) + " |" for item in items]
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One evaluation's outcome.

    Attributes:
      rows: the result rows (each pass, then the combinations: see `Accumulator.rows`).
      compilations: (device function, input shape) pairs compiled.
      buckets: (component, Q, number of view shapes) of each pass.
      undecodable: images that could not be decoded (not counted in the rows).
      probabilities: with keep_probabilities, this process's final softmax outputs
        [local images, classes] (averaged over nets, components and scales), else None.
      indices: their global image indices (this process's images), or None.
    """

    rows: tuple[Row, ...]
    compilations: int
    buckets: tuple[tuple[str, int, int], ...]
    undecodable: int
    probabilities: np.ndarray | None = None
    indices: np.ndarray | None = None

    def summary(self) -> str:
        """One line on how the evaluation ran."""
        buckets = ", ".join(f"{c}@{q}: {n}" for c, q, n in self.buckets)
        return (f"{self.compilations} compilations; view shapes per pass: {buckets}; "
                f"{self.undecodable} undecodable images.")


@dataclasses.dataclass(frozen=True)
class Net:
    """What a row needs to know of a net (evaluator.EvalNet has these fields)."""

    name: str
    version: str
    train_scale: tuple[int, int]


class Accumulator:
    """Gathers the counts and (when needed) the softmax outputs of one evaluation.

    Args:
      nets: the evaluated nets (name, version, train_scale).
      protocol: the protocol (its components and scales index the passes).
      num_local: images this process owns.
      num_classes: classes of the nets.
      keep_probabilities: keep the softmax outputs even if no row combines passes.
    """

    def __init__(self, nets: Sequence[Any], protocol: Protocol, num_local: int,
                 num_classes: int, keep_probabilities: bool = False):
        self.nets = [Net(n.name, n.version, tuple(n.train_scale)) for n in nets]
        self.protocol = protocol
        shape = (len(nets), len(protocol.components), len(protocol.scales))
        # Global metric sums of each (net, component, scale) pass.
        self.pass_totals = np.zeros(shape, dtype=object)
        self.keeps_probabilities = keep_probabilities or shape != (1, 1, 1)
        # Softmax outputs summed over scales, per net and component (local images only).
        self.probability_sums = (
            np.zeros(shape[:2] + (num_local, num_classes), np.float32)
            if self.keeps_probabilities else None)
        self.labels = np.full(num_local, -1, np.int64)
        self.decoded = np.zeros(num_local, bool)
        self._visits = np.zeros(num_local, np.int64)

    def start_pass(self) -> None:
        self._visits[:] = 0

    def add_batch(self, batch: Mapping[str, np.ndarray], component: int,
                  probabilities: Sequence[np.ndarray]) -> None:
        """Records one host batch (rows, labels, mask) and its per-net local probabilities.

        Args:
          batch: "row" (local image, -1 padding), "label", "mask" (decoded, not padding).
          component: the pass's component index.
          probabilities: per net, [local batch, classes] (empty when not kept).
        """
        rows, mask = batch["row"], batch["mask"]
        real = rows >= 0
        self._visits[rows[real]] += 1
        self.labels[rows[real]] = batch["label"][real]
        self.decoded[rows[mask]] = True
        for n, probs in enumerate(probabilities):
            self.probability_sums[n, component, rows[mask]] += probs[mask]

    def end_pass(self, component: int, scale: int, sums: Sequence[Sequence[Mapping]]) -> None:
        """Closes a pass: checks every image was visited once, adds up the nets' sums.

        Args:
          component, scale: the pass's indices.
          sums: per net, the device metric sums of every batch.
        """
        if not np.all(self._visits == 1):
            raise AssertionError(f"Evaluation plan bug: {int(np.sum(self._visits != 1))} "
                                 "images were not visited exactly once.")
        for n, net_sums in enumerate(sums):
            self.pass_totals[n, component, scale] = metrics.add_sums(net_sums)

    def pass_means(self, net: int = 0, component: int = 0, scale: int = 0) -> dict[str, float]:
        """Mean loss, top-1/top-5 error (fractions) and count of one pass."""
        return metrics.means(self.pass_totals[net, component, scale])

    def undecodable(self) -> int:
        """Undecodable images over all processes."""
        return int(parallel.sum_over_processes(np.array([np.sum(~self.decoded)], np.int64))[0])

    def final_probabilities(self) -> np.ndarray:
        """The softmax averaged over nets, components and scales, [local images, classes]."""
        return self.probability_sums.mean(axis=(0, 1)) / len(self.protocol.scales)

    def rows(self) -> tuple[Row, ...]:
        """Every result row: per net, each pass, then its multi-scale and combined-protocol
        averages; with several nets, the ensemble's per component and combined."""
        nets, protocol = self.nets, self.protocol
        all_scales, num_scales = protocol.scales, len(protocol.scales)
        specs = []  # (members, protocol name, scales, global totals or local probabilities)
        for n, net in enumerate(nets):
            for c, component in enumerate(protocol.components):
                specs += [([net], component, (q,), self.pass_totals[n, c, s])
                          for s, q in enumerate(all_scales)]
                if num_scales > 1:
                    specs.append(([net], component, all_scales, self._mean(n, c)))
            if len(protocol.components) > 1:
                specs.append(([net], protocol.name, all_scales, self._mean(n, slice(None))))
        if len(nets) > 1:
            for c, component in enumerate(protocol.components):
                specs.append((nets, component, all_scales, self._mean(slice(None), c)))
            if len(protocol.components) > 1:
                specs.append((nets, protocol.name, all_scales,
                              self._mean(slice(None), slice(None))))
        return self._finish(specs)

    def _mean(self, nets, components) -> np.ndarray:
        sums = self.probability_sums[nets, components]
        axes = tuple(range(sums.ndim - 2))
        return (sums.mean(axis=axes) if axes else sums) / len(self.protocol.scales)

    def _finish(self, specs) -> tuple[Row, ...]:
        # Averaged probabilities are local: their counts are summed over processes at once.
        combined = [i for i, spec in enumerate(specs) if isinstance(spec[3], np.ndarray)]
        valid = self.decoded
        local = np.array([[metrics.host_sums(specs[i][3][valid], self.labels[valid])[key]
                           for key in ("top1_errors", "top5_errors", "count")]
                          for i in combined], np.float64).reshape(-1, 3)
        global_counts = dict(zip(combined, parallel.sum_over_processes(local)))
        rows = []
        for i, (members, name, scales, totals) in enumerate(specs):
            if i in global_counts:  # gathered through jax: float32 (exact below 2^24 images)
                top1, top5, count = (float(v) for v in global_counts[i])
            else:
                top1, top5, count = (totals[k] for k in ("top1_errors", "top5_errors", "count"))
            rows.append(Row(
                nets=tuple(m.name for m in members), versions=tuple(m.version for m in members),
                train_scales=tuple(m.train_scale for m in members), test_scales=tuple(scales),
                protocol=name, top1_error=_percent(top1, count), top5_error=_percent(top5, count),
                images=round(count)))
        return tuple(rows)


def _percent(errors: float, count: float) -> float:
    return 100.0 * errors / count if count else float("nan")


def write_results(
    workdir: str, evaluation: Evaluation, extra: Mapping[str, Any]
) -> tuple[str, str]:
    """Writes the newest evaluation into the workdir and appends it to its history.

    eval_results.json and eval_results.md hold the newest evaluation; every evaluation is
    also appended as one line to eval_history.jsonl, so running one protocol after another
    keeps all their rows.

    Args:
      workdir: the run's directory.
      evaluation: what the evaluator returned.
      extra: more fields to record (split, checkpoints, steps, protocol).

    Returns:
      The paths of eval_results.json and eval_results.md.
    """
    os.makedirs(workdir, exist_ok=True)
    json_path = os.path.join(workdir, RESULTS_BASENAME + ".json")
    md_path = os.path.join(workdir, RESULTS_BASENAME + ".md")
    payload = {"rows": [row.to_json() for row in evaluation.rows],
               "compilations": evaluation.compilations,
               "buckets": [list(b) for b in evaluation.buckets],
               "undecodable": evaluation.undecodable, **extra,
               "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(json_path, "w") as f:
        json.dump(payload, f, indent=1)
    with open(os.path.join(workdir, HISTORY_FILENAME), "a") as f:
        f.write(json.dumps(payload) + "\n")
    with open(md_path, "w") as f:
        f.write(format_table(evaluation.rows) + "\n\n" + evaluation.summary() + "\n")
        for key, value in extra.items():
            f.write(f"{key}: {value}\n")
    return json_path, md_path
