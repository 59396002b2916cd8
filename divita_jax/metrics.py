"""Paper metrics: trapezoidal PR-AUC (muAP, mAP, wAP, sAP, per genre).

All values are areas under the precision-recall curve by the trapezoidal
rule, i.e. `sklearn.metrics.auc(recall, precision)` of
`precision_recall_curve`, as the reference computes them (NOT average
precision; `average_precision` is offered as an extra). Values in [0, 1];
reports multiply by 100.

No positives. PR-AUC is undefined when `labels` has no positive (recall is
0/0): `pr_auc` returns NaN, as the reference's scikit-learn did (newer
scikit-learn sets recall to 1 and returns 0.5). As in the reference, mAP
counts such a genre as 0, its wAP weight is 0, and its per-genre value is
NaN. sAP averages over trailers with at least one positive genre (the
reference would return NaN; every Trailers12k trailer has a genre).
"""

import numpy as np

from tfds_trailers12k.genres import NUM_GENRES, SHORT_NAMES


def _curve_counts(scores, labels):
  """Cumulative (tps, fps) at each distinct threshold, highest first."""
  scores = np.asarray(scores, np.float64).reshape(-1)
  labels = np.asarray(labels).reshape(-1)
  if scores.shape != labels.shape:
    raise ValueError(
      f"scores and labels differ in size: {scores.size} vs {labels.size}."
    )
  if scores.size == 0:
    raise ValueError("PR-AUC of empty scores.")
  if not np.all(np.isfinite(scores)):
    raise ValueError("scores contain NaN or infinite values.")
  if not np.all((labels == 0) | (labels == 1)):
    raise ValueError("labels must be binary (0/1 or bool).")
  order = np.argsort(-scores, kind="mergesort")
  scores, labels = scores[order], labels[order].astype(np.float64)
  # Tied scores form one threshold: keep the last index of each run.
  last = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
  tps = np.cumsum(labels)[last]
  fps = last + 1 - tps
  return tps, fps


def pr_auc(scores, labels) -> float:
  """Trapezoidal area under the precision-recall curve (NaN: no positive)."""
  tps, fps = _curve_counts(scores, labels)
  if tps[-1] == 0:
    return float("nan")
  precision = tps / (tps + fps)
  recall = tps / tps[-1]
  # The curve starts at (recall 0, precision 1), as scikit-learn's does.
  return float(np.trapezoid(np.r_[1.0, precision], np.r_[0.0, recall]))


def average_precision(scores, labels) -> float:
  """Average precision (step-wise sum; not the paper's metric). NaN: no
  positive."""
  tps, fps = _curve_counts(scores, labels)
  if tps[-1] == 0:
    return float("nan")
  recall = tps / tps[-1]
  return float(np.sum(np.diff(np.r_[0.0, recall]) * tps / (tps + fps)))


def compute_metrics(probs, labels) -> dict[str, float]:
  """muAP ('uap'), mAP, wAP, sAP and per-genre PR-AUC of [N, 10] inputs."""
  probs = np.asarray(probs, np.float64)
  labels = np.asarray(labels)
  if probs.ndim != 2 or probs.shape[1] != NUM_GENRES:
    raise ValueError(f"probs must be [N, {NUM_GENRES}], got {probs.shape}.")
  if labels.shape != probs.shape:
    raise ValueError(
      f"labels shape {labels.shape} differs from probs {probs.shape}."
    )
  labels = labels.astype(np.int64)
  genre = np.array([pr_auc(p, t) for p, t in zip(probs.T, labels.T)])
  genre0 = np.nan_to_num(genre, nan=0.0)
  positives = labels.sum(axis=0)
  if positives.sum() == 0:
    raise ValueError("labels have no positive at all: PR-AUC is undefined.")
  trailer = np.array([pr_auc(p, t) for p, t in zip(probs, labels)])
  out = {
    "uap": pr_auc(probs, labels),
    "map": float(genre0.mean()),
    "wap": float(np.sum(genre0 * positives) / positives.sum()),
    "sap": float(np.mean(trailer[labels.sum(axis=1) > 0])),
  }
  out.update({n: float(v) for n, v in zip(SHORT_NAMES, genre)})
  return out


def average_windows(window_probs, trailer_index, num_trailers: int):
  """Mean of window probabilities per trailer: [W, C] -> [num_trailers, C].

  `trailer_index[w]` is the trailer of window w; entries < 0 are batch
  padding and ignored. Every trailer must have at least one window.
  """
  probs = np.asarray(window_probs, np.float64)
  index = np.asarray(trailer_index).reshape(-1)
  if probs.ndim != 2 or probs.shape[0] != index.shape[0]:
    raise ValueError(
      f"window_probs {probs.shape} and trailer_index {index.shape} must be "
      "[W, C] and [W]."
    )
  if not np.issubdtype(index.dtype, np.integer):
    raise ValueError(f"trailer_index must be integer, got {index.dtype}.")
  keep = index >= 0
  probs, index = probs[keep], index[keep]
  if index.size and index.max() >= num_trailers:
    raise ValueError(
      f"trailer_index {index.max()} out of range for {num_trailers} trailers."
    )
  counts = np.bincount(index, minlength=num_trailers)
  if np.any(counts == 0):
    missing = np.flatnonzero(counts == 0)[:10].tolist()
    raise ValueError(f"Trailers without any window: {missing} (first 10).")
  sums = np.zeros((num_trailers, probs.shape[1]))
  np.add.at(sums, index, probs)
  return sums / counts[:, None]
