"""From per-scale descriptors to the paper's score: aggregation, linear SVM, metric.

Appendix B aggregates the descriptors of the scales Q either by averaging them or by
stacking (concatenating) them, L2-normalises the result, and trains a linear SVM on the
target data set's training split. The metric is the data set's: mean class recall (mean
over classes of the share of test images classified correctly; Caltech-101/256) for
single-label data, mean average precision (VOC) for multi-label data.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score
from sklearn.multiclass import OneVsRestClassifier
from sklearn.svm import LinearSVC

AVERAGE, STACK = "average", "stack"
AGGREGATIONS = (AVERAGE, STACK)
MEAN_CLASS_RECALL, MEAN_AP = "mean_class_recall", "map"
# Guards the L2 normalisation of an all-zero descriptor.
_TINY = 1e-12


def aggregate(descriptors: np.ndarray, how: str) -> np.ndarray:
    """Combines per-scale descriptors and L2-normalises each image's result.

    Args:
      descriptors: [images, scales, features].
      how: "average" (features kept) or "stack" (scales x features).

    Returns:
      float32 [images, features] or [images, scales * features], unit L2 norm.

    Raises:
      ValueError: for another `how`.
    """
    if how == AVERAGE:
        x = descriptors.mean(axis=1)
    elif how == STACK:
        x = descriptors.reshape(descriptors.shape[0], -1)
    else:
        raise ValueError(f"Unknown aggregation {how!r}; use one of {AGGREGATIONS}.")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, _TINY)).astype(np.float32)


def mean_class_recall(labels: np.ndarray, predicted: np.ndarray) -> float:
    """Mean over the classes present of the share of their images predicted right.

    Args:
      labels: int [N] true classes.
      predicted: int [N] predicted classes.

    Returns:
      A fraction in [0, 1].
    """
    classes = np.unique(labels)
    return float(np.mean([np.mean(predicted[labels == c] == c) for c in classes]))


def mean_average_precision(targets: np.ndarray, scores: np.ndarray) -> float:
    """Mean over classes of the average precision of the scores (multi-label data).

    scikit-learn's average precision (the area under the precision-recall steps), not
    VOC-2007's 11-point interpolation: both rank the same way, the numbers differ slightly.

    Args:
      targets: {0, 1} [N, classes].
      scores: [N, classes] decision values.

    Returns:
      A fraction in [0, 1], over the classes with at least one positive.
    """
    present = targets.sum(axis=0) > 0
    return float(np.mean([average_precision_score(targets[:, c], scores[:, c])
                          for c in np.flatnonzero(present)]))


def fit_and_score(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                  test_y: np.ndarray, c: float, seed: int = 0) -> tuple[str, float]:
    """Trains a linear SVM (one-vs-rest) and scores it on the test split.

    Args:
      train_x, test_x: L2-normalised descriptors.
      train_y, test_y: int [N] classes, or {0, 1} [N, classes] for multi-label data.
      c: the SVM's regularisation constant C.
      seed: seeds the solver's coordinate order.

    Returns:
      (metric name, value as a fraction): mean class recall, or mAP for multi-label data.
    """
    svm = LinearSVC(C=c, random_state=seed)
    if train_y.ndim == 2:
        model = OneVsRestClassifier(svm).fit(train_x, train_y)
        return MEAN_AP, mean_average_precision(test_y, model.decision_function(test_x))
    model = svm.fit(train_x, train_y)
    return MEAN_CLASS_RECALL, mean_class_recall(test_y, model.predict(test_x))
