"""Paper metrics against scikit-learn's auc(recall, precision)."""

import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from divita_jax import metrics
from tfds_trailers12k.genres import SHORT_NAMES


def sk_pr_auc(scores, labels):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    precision, recall, _ = skm.precision_recall_curve(labels, scores)
  return skm.auc(recall, precision)


def sk_metrics(probs, labels):
  """The reference's compute_full_metrics (positive rows for sAP)."""
  genre = np.array([sk_pr_auc(p, t) for p, t in zip(probs.T, labels.T)])
  genre[labels.sum(0) == 0] = 0.0  # Reference: NaN -> 0 (see module doc).
  rows = labels.sum(1) > 0
  return {
    "uap": sk_pr_auc(probs.ravel(), labels.ravel()),
    "map": genre.mean(),
    "wap": np.average(genre, weights=labels.sum(0) / labels.sum()),
    "sap": np.mean(
      [sk_pr_auc(p, t) for p, t in zip(probs[rows], labels[rows])]
    ),
    **dict(zip(SHORT_NAMES, genre)),
  }


def random_case(seed, n=60, levels=None):
  rng = np.random.default_rng(seed)
  labels = (rng.random((n, 10)) < 0.3).astype(int)
  labels[np.arange(n), rng.integers(0, 10, n)] = 1  # >= 1 genre per trailer
  probs = rng.random((n, 10))
  if levels:  # Coarse scores: many ties across and within classes.
    probs = np.round(probs * levels) / levels
  return probs, labels


@pytest.mark.parametrize("seed,levels", [(0, None), (1, None), (2, 4), (3, 2)])
def test_pr_auc_matches_sklearn(seed, levels):
  probs, labels = random_case(seed, levels=levels)
  for p, t in [(probs.ravel(), labels.ravel()), (probs[:, 0], labels[:, 0])]:
    np.testing.assert_allclose(
      metrics.pr_auc(p, t), sk_pr_auc(p, t), rtol=0, atol=1e-12
    )


def test_pr_auc_small_cases():
  assert metrics.pr_auc([0.9, 0.1], [1, 0]) == 1.0
  # One tied threshold: precision 0.5 from recall 0 (start point 1) to 1.
  assert metrics.pr_auc([0.5, 0.5], [1, 0]) == pytest.approx(0.75)
  assert np.isnan(metrics.pr_auc([0.2, 0.3], [0, 0]))
  np.testing.assert_allclose(
    metrics.average_precision([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]),
    skm.average_precision_score([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]),
  )


@pytest.mark.parametrize("seed,levels", [(0, None), (4, 3)])
def test_compute_metrics_matches_reference(seed, levels):
  probs, labels = random_case(seed, levels=levels)
  got = metrics.compute_metrics(probs, labels)
  want = sk_metrics(probs, labels)
  assert set(got) == {"uap", "map", "wap", "sap", *SHORT_NAMES}
  for k in want:
    np.testing.assert_allclose(got[k], want[k], atol=1e-12, err_msg=k)
    assert 0 <= got[k] <= 1


def test_genre_and_trailer_without_positives():
  probs, labels = random_case(5, n=40)
  labels[:, 3] = 0  # cri: no positives at all.
  labels[7] = 0  # A trailer with no genre.
  got = metrics.compute_metrics(probs, labels)
  want = sk_metrics(probs, labels)
  assert np.isnan(got["cri"])  # Undefined, as in the reference.
  for k in ["uap", "map", "wap", "sap"]:
    np.testing.assert_allclose(got[k], want[k], atol=1e-12, err_msg=k)
  # mAP counts the missing genre as 0: mean of the other nine / 10.
  others = [got[n] for n in SHORT_NAMES if n != "cri"]
  np.testing.assert_allclose(got["map"], np.sum(others) / 10, atol=1e-12)
  # sAP skips the empty trailer: dropping it changes nothing.
  rest = np.delete(np.arange(40), 7)
  np.testing.assert_allclose(
    got["sap"],
    metrics.compute_metrics(probs[rest], labels[rest])["sap"],
    atol=1e-12,
  )


def test_average_windows():
  probs = np.array([[0.2] * 10, [0.4] * 10, [0.9] * 10, [5.0] * 10])
  index = np.array([1, 0, 1, -1])  # Last window is batch padding.
  out = metrics.average_windows(probs, index, 2)
  np.testing.assert_allclose(out[:, 0], [0.4, 0.55])
  assert out.shape == (2, 10)


def test_bad_inputs():
  with pytest.raises(ValueError, match="binary"):
    metrics.pr_auc([0.1, 0.2], [0, 2])
  with pytest.raises(ValueError, match="differ in size"):
    metrics.pr_auc([0.1, 0.2], [0])
  with pytest.raises(ValueError, match=r"\[N, 10\]"):
    metrics.compute_metrics(np.zeros((4, 9)), np.zeros((4, 9)))
  with pytest.raises(ValueError, match="without any window: \\[2\\]"):
    metrics.average_windows(np.zeros((2, 10)), [0, 1], 3)
  with pytest.raises(ValueError, match="out of range"):
    metrics.average_windows(np.zeros((2, 10)), [0, 3], 3)
