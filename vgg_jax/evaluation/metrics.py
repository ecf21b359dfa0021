"""The one top-k and the metric sums, for training, validation and evaluation alike.

Everything is a weighted sum (loss, top-1 and top-k errors, count), so shards, batches,
processes and passes add up exactly, and a mean is taken once at the end. Scores may be
logits (training) or log-probabilities (evaluation, `protocols.log_probabilities`): both
rank the classes alike, and the softmax cross-entropy of log-probabilities is their
negative value at the label.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

# The k of the top-k error reported besides top-1 (the paper reports top-1 and top-5).
TOP_K = 5
# Rows of host-side probabilities scored per call (bounds device memory for 50,000 images).
_HOST_CHUNK = 4096
_SUM_KEYS = ("loss", "top1_errors", "top5_errors", "count")


def classification_sums(
    scores: jax.Array, labels: jax.Array, weights: jax.Array
) -> dict[str, jax.Array]:
    """Weighted sums of loss and top-1/top-k errors.

    Args:
      scores: [N, classes] float32 logits or log-probabilities.
      labels: [N] integer class indices (any value where the weight is 0).
      weights: [N] float32; 0 for padding and undecodable images.

    Returns:
      {"loss": sum of cross-entropy, "top1_errors", "top5_errors", "count"}. Ties rank
      the lower class index first (lax.top_k).
    """
    valid = weights > 0
    safe_labels = jnp.where(valid, labels, 0)
    losses = optax.softmax_cross_entropy_with_integer_labels(scores, safe_labels)
    k = min(TOP_K, scores.shape[-1])
    _, top_k = jax.lax.top_k(scores, k)
    in_top_k = jnp.any(top_k == safe_labels[:, None], axis=-1)
    top1_wrong = top_k[:, 0] != safe_labels
    return {
        "loss": jnp.sum(jnp.where(valid, losses, 0.0) * weights),
        "top1_errors": jnp.sum(top1_wrong * weights),
        "top5_errors": jnp.sum(~in_top_k * weights),
        "count": jnp.sum(weights),
    }


_jitted_sums = jax.jit(classification_sums)


def host_sums(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """`classification_sums` of host-side probabilities (averages over scales or nets).

    Args:
      probabilities: [N, classes] float32 (rows sum to 1).
      labels: [N] class indices; every row counts.

    Returns:
      The sums as floats.
    """
    totals = dict.fromkeys(_SUM_KEYS, 0.0)
    # log(0) = -inf ranks last and only enters the (unreported) loss of such a row.
    with np.errstate(divide="ignore"):
        for start in range(0, len(labels), _HOST_CHUNK):
            stop = start + _HOST_CHUNK
            chunk = _jitted_sums(np.log(probabilities[start:stop]),
                                 np.asarray(labels[start:stop], np.int32),
                                 np.ones(len(labels[start:stop]), np.float32))
            for key, value in jax.device_get(chunk).items():
                totals[key] += float(value)
    return totals


def add_sums(sums_list: Sequence[Mapping[str, jax.Array | float]]) -> dict[str, float]:
    """Adds up metric sums (device or host values) into floats.

    Args:
      sums_list: dicts with the keys of `classification_sums` (more keys are ignored).

    Returns:
      The totals, zeros when the list is empty.
    """
    host = jax.device_get([{key: s[key] for key in _SUM_KEYS} for s in sums_list])
    return {key: float(np.sum([s[key] for s in host])) for key in _SUM_KEYS}


def means(totals: Mapping[str, float]) -> dict[str, float]:
    """Mean metrics from sums: {"loss", "top1_error", "top5_error" (fractions), "count"}."""
    count = max(totals["count"], 1.0)
    return {
        "loss": totals["loss"] / count,
        "top1_error": totals["top1_errors"] / count,
        "top5_error": totals["top5_errors"] / count,
        "count": totals["count"],
    }


def summarize(sums_list: Sequence[Mapping[str, jax.Array]]) -> dict[str, float]:
    """Mean metrics of a list of per-step sums ({} for an empty list)."""
    if not sums_list:
        return {}
    return means(add_sums(sums_list))
