"""The paper's ILSVRC-2012 validation results (Tables 3-6) and which result rows they match.

Every figure is a (top-1, top-5) error in percent. The test protocol of each table:

- Table 3: dense evaluation at one test scale, Q = S for fixed S and Q = 384 for S in
  [256, 512].
- Table 4: dense evaluation over three test scales, {S-32, S, S+32} for fixed S and
  {256, 384, 512} for S in [256, 512], softmax averaged.
- Table 5: the jittered D and E over {256, 384, 512}: dense, multi-crop (5x5 grid, flips)
  and both combined.
- Table 6: the ensemble of the jittered D and E, dense and multi-crop combined.

Rows are matched on their fields (versions, training scales, test scales, protocol), never
on their printed labels.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from vgg_jax.evaluation.protocols import scales_for

# Training scales (S_min, S_max) of the paper's nets.
FIXED_256, FIXED_384, JITTERED = (256, 256), (384, 384), (256, 512)
TABLE_ORDER = ("Table 3", "Table 4", "Table 5", "Table 6")

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


class Setting(Protocol):
    """What a row must tell to be matched (results.Row has these fields)."""

    versions: tuple[str, ...]
    train_scales: tuple[tuple[int, int], ...]
    test_scales: tuple[int, ...]
    protocol: str


class PaperResult(NamedTuple):
    """The paper's figure that one of our result rows reproduces."""

    table: str
    top1_error: float
    top5_error: float


def paper_result(row: Setting) -> PaperResult | None:
    """The paper's result for the setting of one evaluation row, if the paper has one.

    Args:
      row: a result row (versions, training scales, test scales, protocol).

    Returns:
      The matching PaperResult, or None when the paper reports no such setting (another
      test scale, a single-crop protocol, a net or ensemble it did not evaluate).
    """
    versions = [v for v in row.versions if v]
    train_scales = [tuple(s) for s in row.train_scales]
    protocol, test_scales = row.protocol, tuple(row.test_scales)
    if len(versions) == 2 and all(s == JITTERED for s in train_scales):
        figures = TABLE_6.get((tuple(sorted(versions)), protocol))
        if figures and test_scales == scales_for(JITTERED, multi_scale=True):
            return PaperResult("Table 6", *figures)
        return None
    if len(versions) != 1 or len(train_scales) != 1:
        return None
    version, train_s = versions[0], train_scales[0]
    single, multi = scales_for(train_s), scales_for(train_s, multi_scale=True)
    if train_s == JITTERED and test_scales == multi and (version, protocol) in TABLE_5:
        return PaperResult("Table 5", *TABLE_5[(version, protocol)])
    if protocol != "dense":
        return None
    if test_scales == single and (version, train_s) in TABLE_3:
        return PaperResult("Table 3", *TABLE_3[(version, train_s)])
    if test_scales == multi and (version, train_s) in TABLE_4:
        return PaperResult("Table 4", *TABLE_4[(version, train_s)])
    return None


def table_rank(result: PaperResult | None) -> int:
    """Sort key that puts the paper's tables first, in the paper's order."""
    return TABLE_ORDER.index(result.table) if result else len(TABLE_ORDER)
