"""The paper's test scales and ILSVRC-2012 validation results (Tables 3-6), and which of our
result rows they match.

Every figure is a (top-1, top-5) error in percent. The test protocol of each table:

- Table 3: dense evaluation at one test scale, Q = S for fixed S and Q = 384 for S in
  [256, 512].
- Table 4: dense evaluation over three test scales, {S-32, S, S+32} for fixed S and
  {256, 384, 512} for S in [256, 512], softmax averaged.
- Table 5: the jittered D and E over {256, 384, 512}: dense, multi-crop (5x5 grid, flips)
  and both combined.
- Table 6: the ensemble of the jittered D and E, dense and multi-crop combined.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

# Training scales as evaluation rows label them (EvalNet.train_scale_label).
FIXED_256, FIXED_384, JITTERED = "256", "384", "[256;512]"
# Paper 3.2: multi-scale testing of a fixed-S net uses Q in {S - 32, S, S + 32}.
_MULTI_SCALE_OFFSET = 32

# (version, train S) -> (top-1, top-5).
TABLE_3 = {
    ("A", FIXED_256): (29.6, 10.4),
    ("A_LRN", FIXED_256): (29.7, 10.5),
    ("B", FIXED_256): (28.7, 9.9),
    ("C", FIXED_256): (28.1, 9.4), ("C", FIXED_384): (28.1, 9.3), ("C", JITTERED): (27.3, 8.8),
    ("D", FIXED_256): (27.0, 8.8), ("D", FIXED_384): (26.8, 8.7), ("D", JITTERED): (25.6, 8.1),
    ("E", FIXED_256): (27.3, 9.0), ("E", FIXED_384): (26.9, 8.7), ("E", JITTERED): (25.5, 8.0),
}
TABLE_4 = {
    ("B", FIXED_256): (28.2, 9.6),
    ("C", FIXED_256): (27.7, 9.2), ("C", FIXED_384): (27.8, 9.2), ("C", JITTERED): (26.3, 8.2),
    ("D", FIXED_256): (26.6, 8.6), ("D", FIXED_384): (26.5, 8.6), ("D", JITTERED): (24.8, 7.5),
    ("E", FIXED_256): (26.9, 8.7), ("E", FIXED_384): (26.7, 8.6), ("E", JITTERED): (24.8, 7.5),
}
# (version, protocol) -> (top-1, top-5), jittered nets over {256, 384, 512}.
TABLE_5 = {
    ("D", "dense"): (24.8, 7.5), ("D", "multi_crop"): (24.6, 7.5),
    ("D", "dense+multi_crop"): (24.4, 7.2),
    ("E", "dense"): (24.8, 7.5), ("E", "multi_crop"): (24.6, 7.4),
    ("E", "dense+multi_crop"): (24.4, 7.1),
}
# (sorted versions, protocol) -> (top-1, top-5), jittered nets over {256, 384, 512}.
TABLE_6 = {(("D", "E"), "dense+multi_crop"): (23.7, 6.8)}


class PaperResult(NamedTuple):
    """The paper's figure that one of our result rows reproduces."""

    table: str
    top1_error: float
    top5_error: float


def test_scales(
    scales: Sequence[int], train_scale_min: int, train_scale_max: int, multi_scale: bool = False
) -> tuple[int, ...]:
    """The test scales Q of the paper's protocols (3.2, 4.1, 4.2).

    Args:
      scales: explicit scales (config.eval.scales); used as given when not empty.
      train_scale_min, train_scale_max: the net's training scale S (equal for fixed S).
      multi_scale: with no explicit scales, the paper's multi-scale set: {S-32, S, S+32}
        for fixed S, {S_min, (S_min+S_max)/2, S_max} ({256, 384, 512}) for jittered S.
        Otherwise the single-scale protocol: Q = S for fixed S, (S_min+S_max)/2 (384)
        for jittered S.

    Returns:
      A tuple of test scales.
    """
    if len(scales):
        return tuple(int(q) for q in scales)
    lo, hi = int(train_scale_min), int(train_scale_max)
    mid = (lo + hi) // 2
    if not multi_scale:
        return (mid,)
    if lo == hi:
        return (lo - _MULTI_SCALE_OFFSET, lo, lo + _MULTI_SCALE_OFFSET)
    return (lo, mid, hi)


def _scale_labels(train_s: str) -> tuple[str, str] | None:
    """(single test scale, multi-scale set) of the paper's protocols, as rows label them."""
    bounds = train_s.strip("[]").split(";")
    if not all(b.isdigit() for b in bounds):
        return None
    lo, hi = int(bounds[0]), int(bounds[-1])
    single, multi = test_scales((), lo, hi), test_scales((), lo, hi, multi_scale=True)
    return ",".join(map(str, single)), ",".join(map(str, multi))


def paper_result(row: Mapping[str, Any]) -> PaperResult | None:
    """The paper's result for the setting of one evaluation row, if the paper has one.

    Args:
      row: a row of `evaluate.evaluate_nets` (keys "versions", "train_S", "test_Q",
        "protocol").

    Returns:
      The matching PaperResult, or None when the paper reports no such setting (another
      test scale, a single-crop protocol, a net or ensemble it did not evaluate).
    """
    versions = [v for v in row.get("versions") or [] if v]
    train_scales = [s.strip() for s in str(row["train_S"]).split(",")]
    protocol, test_q = row["protocol"], str(row["test_Q"])
    if len(versions) == 2 and all(s == JITTERED for s in train_scales):
        figures = TABLE_6.get((tuple(sorted(versions)), protocol))
        if figures and test_q == _scale_labels(JITTERED)[1]:
            return PaperResult("Table 6", *figures)
        return None
    if len(versions) != 1 or len(train_scales) != 1:
        return None
    version, train_s = versions[0], train_scales[0]
    scales = _scale_labels(train_s)
    if scales is None:
        return None
    single, multi = scales
    if train_s == JITTERED and test_q == multi and (version, protocol) in TABLE_5:
        return PaperResult("Table 5", *TABLE_5[(version, protocol)])
    if protocol != "dense":
        return None
    if test_q == single and (version, train_s) in TABLE_3:
        return PaperResult("Table 3", *TABLE_3[(version, train_s)])
    if test_q == multi and (version, train_s) in TABLE_4:
        return PaperResult("Table 4", *TABLE_4[(version, train_s)])
    return None


def compare(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Our rows next to the paper's figures.

    Args:
      rows: evaluation rows (with "top1_error", "top5_error" in percent).

    Returns:
      Copies of the rows with "paper_table", "paper_top1_error", "paper_top5_error"
      (None where the paper has no such setting).
    """
    compared = []
    for row in rows:
        paper = paper_result(row)
        compared.append(dict(
            row, paper_table=paper.table if paper else None,
            paper_top1_error=paper.top1_error if paper else None,
            paper_top5_error=paper.top5_error if paper else None))
    return compared
