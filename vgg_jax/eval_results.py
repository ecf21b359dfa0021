"""What an evaluation reports: top-k counts, result rows, the results table and its files.

The evaluation driver (vgg_jax.evaluate) tallies each pass's top-1 and top-5 hits with
`Tally`, turns the tallies and the softmax sums into result rows with `result_rows` (every
single scale, the multi-scale average, the combined protocol, the ensemble), and writes them
with `write_results`: eval_results.json and eval_results.md hold the newest evaluation,
eval_history.jsonl all of them (vgg_jax.report reads it). Nothing here runs a net or touches
a device, so the report reads and formats results without importing the evaluation driver.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vgg_jax import metric_names, paper_results

RESULTS_BASENAME = "eval_results"
HISTORY_FILENAME = "eval_history.jsonl"


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


def top_k_correct(probs: np.ndarray, labels: np.ndarray,
                  k: int = metric_names.TOP_K) -> tuple[int, int]:
    """(top-1 correct, top-k correct) counts of a batch of class probabilities."""
    if len(labels) == 0:
        return 0, 0
    k = min(k, probs.shape[-1])
    top = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    hits = top == labels[:, None]
    return int(hits[:, 0].sum()), int(hits.any(axis=1).sum())


@dataclasses.dataclass
class Tally:
    """Counts of correct top-1 and top-5 answers over the images seen so far."""

    top1: int = 0
    top5: int = 0
    count: int = 0

    def add(self, probs: np.ndarray, labels: np.ndarray) -> None:
        t1, t5 = top_k_correct(probs, labels)
        self.top1, self.top5, self.count = self.top1 + t1, self.top5 + t5, self.count + len(labels)


# --------------------------------------------------------------------------------------
# Result rows
# --------------------------------------------------------------------------------------


def result_rows(nets, components, scales, tallies, sums, labels, valid, protocol):
    """Result rows (without errors yet) and their local (top-1, top-5, count) counts.

    One row per net, component and scale; per net and component over all scales; per net
    over all components; and the same for the ensemble when there are several nets.

    Args:
      nets: the EvalNets.
      components: the protocol's passes ("dense", "multi_crop", ...).
      scales: the test scales.
      tallies: per (net index, component, scale) counts.
      sums: per (net index, component) softmax sums over scales, [local images, classes].
      labels: the local images' labels.
      valid: which local images decoded.
      protocol: the protocol's name, for the combined rows.

    Returns:
      (rows, counts): the row dicts and, for each, this process's (top-1, top-5, count).
    """
    rows, counts = [], []
    scales_label = ",".join(str(q) for q in scales)
    y = labels[valid]

    def add(net_name, train_s, test_q, proto, tally, members=None):
        members = nets if members is None else members
        rows.append({"net": net_name, "train_S": train_s, "test_Q": test_q, "protocol": proto,
                     "versions": [n.version for n in members]})
        counts.append((tally.top1, tally.top5, tally.count))

    def tally_of(probs):
        t = Tally()
        t.add(probs[valid], y)
        return t

    def component_mean(i, c):
        return sums[(i, c)] / len(scales)

    for i, net in enumerate(nets):
        for c in components:
            for q in scales:
                add(net.name, net.train_scale_label, str(q), c, tallies[(i, c, q)], [net])
            if len(scales) > 1:
                add(net.name, net.train_scale_label, scales_label, c,
                    tally_of(component_mean(i, c)), [net])
        if len(components) > 1:
            combined = sum(component_mean(i, c) for c in components) / len(components)
            add(net.name, net.train_scale_label, scales_label, protocol, tally_of(combined),
                [net])
    if len(nets) > 1:
        name = " + ".join(net.name for net in nets)
        train_s = ", ".join(net.train_scale_label for net in nets)
        for c in components:
            mean = sum(component_mean(i, c) for i in range(len(nets))) / len(nets)
            add(name, train_s, scales_label, c, tally_of(mean))
        if len(components) > 1:
            mean = sum(
                component_mean(i, c) for i in range(len(nets)) for c in components
            ) / (len(nets) * len(components))
            add(name, train_s, scales_label, protocol, tally_of(mean))
    return rows, counts


def final_probabilities(nets, components, scales, sums):
    """The softmax averaged over nets, protocol components and scales, per local image.

    Args:
      nets: the EvalNets.
      components: the protocol's passes.
      scales: the test scales.
      sums: per (net index, component) softmax sums over scales.

    Returns:
      float32 [local images, classes].
    """
    total = sum(sums[(i, c)] for i in range(len(nets)) for c in components)
    return total / (len(nets) * len(components) * len(scales))


# --------------------------------------------------------------------------------------
# Results table
# --------------------------------------------------------------------------------------

TABLE_COLUMNS = (
    ("net", "net"), ("train_S", "train S"), ("test_Q", "test Q"), ("protocol", "protocol"),
    ("top1_error", "top-1 err (%)"), ("top5_error", "top-5 err (%)"), ("images", "images"),
)


# Appended by `format_table(..., with_paper=True)`: the paper's figure for the same setting.
PAPER_COLUMNS = (
    ("paper_table", "paper"), ("paper_top1_error", "paper top-1 (%)"),
    ("paper_top5_error", "paper top-5 (%)"),
)


def format_table(
    rows: Sequence[Mapping[str, Any]], with_paper: bool = True,
    extra_columns: Sequence[tuple[str, str]] = (),
) -> str:
    """The results as a Markdown table in the paper's format.

    Args:
      rows: result rows of `vgg_jax.evaluate.evaluate_nets`.
      with_paper: add the paper's figures for the rows whose setting the paper reports
        (vgg_jax.paper_results; "-" elsewhere).
      extra_columns: more (row key, title) columns at the end.

    Returns:
      The table, one line per row.
    """
    columns = TABLE_COLUMNS
    if with_paper:
        rows, columns = paper_results.compare(rows), TABLE_COLUMNS + PAPER_COLUMNS
    columns = tuple(columns) + tuple(extra_columns)

    def cell(row, key):
        value = row.get(key)
        if value is None:
            return "-"
        if isinstance(value, float):  # the paper prints one decimal
            return f"{value:.1f}" if key.startswith("paper_") else f"{value:.2f}"
        if isinstance(value, (list, tuple)):
            return ",".join(str(v) for v in value)
        return str(value)

    lines = ["| " + " | ".join(title for _, title in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row, key) for key, _ in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(
    workdir: str, result: Mapping[str, Any], extra: Mapping[str, Any]
) -> tuple[str, str]:
    """Writes the newest evaluation into the workdir and appends it to its history.

    eval_results.json and eval_results.md hold the newest evaluation; every evaluation is
    also appended as one line to eval_history.jsonl, so running one protocol after another
    keeps all their rows.

    Args:
      workdir: the run's directory.
      result: what `vgg_jax.evaluate.evaluate_nets` returned.
      extra: more fields to record (split, checkpoints, steps, protocol).

    Returns:
      The paths of eval_results.json and eval_results.md.
    """
    os.makedirs(workdir, exist_ok=True)
    json_path = os.path.join(workdir, RESULTS_BASENAME + ".json")
    md_path = os.path.join(workdir, RESULTS_BASENAME + ".md")
    payload = {key: result[key] for key in ("rows", "compilations", "buckets", "undecodable")}
    payload.update(extra)
    payload["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    with open(json_path, "w") as f:
        json.dump(payload, f, indent=1)
    with open(os.path.join(workdir, HISTORY_FILENAME), "a") as f:
        f.write(json.dumps(payload) + "\n")
    with open(md_path, "w") as f:
        f.write(format_table(result["rows"]) + "\n\n")
        f.write(f"{result['compilations']} compilations; buckets per pass: "
                f"{json.dumps(result['buckets'])}; undecodable images: {result['undecodable']}.\n")
        for key, value in extra.items():
            f.write(f"{key}: {value}\n")
    return json_path, md_path
