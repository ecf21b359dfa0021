"""Greedy merging of one class's boxes (OverFeat's procedure, the paper's Appendix A).

Dense localisation predicts a box of a class at every output location (of every scale
and net); neighbouring locations see the same object and predict overlapping boxes.
OverFeat merges them greedily: while the closest pair of boxes is close enough, the pair
is replaced by its merge. Then the box with the largest accumulated score is the class's
guess. Choices where OverFeat and the paper leave room (docs/localisation.md):

- closeness is IoU (inclusive-pixel areas, `metric.iou`), and a pair merges while its IoU
  is at least `min_iou`;
- a merge is the score-weighted average of the pair's coordinates, and its score the sum
  of theirs, so a merged box is the score-weighted mean of every box it absorbed, and
  boxes that many confident locations agree on win.
"""

from __future__ import annotations

import numpy as np

from vgg_jax.localisation.metric import iou

# The overlap of a box with itself or with one merged away: below any min_iou in (0, 1].
_NO_PAIR = -1.0


def greedy_merge(boxes: np.ndarray, scores: np.ndarray, min_iou: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Merges the closest pair of boxes, again and again, while their IoU >= min_iou.

    Args:
      boxes: [N, 4] pixel boxes of one class.
      scores: [N] their scores (the class's probability at the box's location), >= 0.
      min_iou: pairs overlapping at least this much merge (in (0, 1]).

    Returns:
      (merged boxes [M, 4], their scores [M]), M <= N, highest score first. A pair of
      equal IoU to another is merged in index order (the first pair found).
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4).copy()
    scores = np.asarray(scores, np.float64).reshape(-1).copy()
    if len(boxes) != len(scores):
        raise ValueError(f"{len(boxes)} boxes but {len(scores)} scores.")
    overlaps = iou(boxes[:, None], boxes[None])
    np.fill_diagonal(overlaps, _NO_PAIR)
    # A merged-away box stays in place, its row and column out of reach: no copy of the
    # N x N matrix per merge, and the first pair found is the same as in the compacted one.
    alive = np.ones(len(boxes), bool)
    for _ in range(len(boxes) - 1):
        i, j = np.unravel_index(np.argmax(overlaps), overlaps.shape)
        if overlaps[i, j] < min_iou:
            break
        i, j = min(i, j), max(i, j)
        total = scores[i] + scores[j]
        weights = (np.array([scores[i], scores[j]]) / total if total > 0
                   else np.array([0.5, 0.5]))
        boxes[i] = weights @ boxes[[i, j]]
        scores[i] = total
        alive[j] = False
        overlaps[j] = overlaps[:, j] = _NO_PAIR
        # Only the merged box's overlaps changed.
        overlaps[i] = overlaps[:, i] = np.where(alive, iou(boxes[i][None], boxes), _NO_PAIR)
        overlaps[i, i] = _NO_PAIR
    kept = np.flatnonzero(alive)
    order = kept[np.argsort(-scores[kept], kind="stable")]
    return boxes[order], scores[order]


def best_box(boxes: np.ndarray, scores: np.ndarray, min_iou: float
             ) -> tuple[np.ndarray, float]:
    """One class's guess: the merged box with the largest accumulated score.

    Args:
      boxes, scores, min_iou: as `greedy_merge` (at least one box).

    Returns:
      (pixel box [4], its score).
    """
    merged, merged_scores = greedy_merge(boxes, scores, min_iou)
    return merged[0], float(merged_scores[0])
