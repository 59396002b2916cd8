"""Results tables: per-fold CSVs and the mean +- sample std summary."""

import json
import os

import numpy as np

from divita_jax import report
from tfds_trailers12k import genres


def _fold_result(seed):
  rng = np.random.default_rng(seed)
  metrics = {k: float(rng.uniform()) for k in report.METRIC_COLUMNS}
  return {"epoch": seed + 3, "val": metrics, "test": dict(metrics)}


def test_write_results_round_trip(tmp_path):
  results = {f: _fold_result(f) for f in range(3)}
  report.write_results(results, str(tmp_path), "test run")
  rows = report.read_csv(str(tmp_path / "test.csv"))
  assert [r["fold"] for r in rows] == [0, 1, 2]
  assert [r["epoch"] for r in rows] == [3, 4, 5]
  for fold, row in enumerate(rows):
    for key in report.METRIC_COLUMNS:
      assert abs(row[key] - 100 * results[fold]["test"][key]) < 0.006
  header = (tmp_path / "val.csv").read_text().splitlines()[0].split(",")
  assert header[:6] == ["fold", "epoch", "uap", "map", "wap", "sap"]
  assert header[6:] == list(genres.SHORT_NAMES)


def test_summary_uses_sample_std():
  rows = [{"uap": v} for v in (70.0, 72.0, 74.0)]
  assert report.mean_std(rows, "uap") == "72.00 +- 2.00"  # ddof=1.


def test_summary_skips_undefined_folds():
  rows = [{"hor": v} for v in (float("nan"), 50.0, 70.0)]
  assert report.mean_std(rows, "hor") == "60.00 +- 14.14 (2/3 folds)"
  assert report.mean_std([{"hor": float("nan")}], "hor") == "n/a"


def _summary(per_fold_hor):
  rows = []
  for fold, hor in enumerate(per_fold_hor):
    row = {k: 50.0 + fold for k in report.METRIC_COLUMNS}
    rows.append({**row, "fold": fold, "hor": hor})
  return report.summary_markdown({"test": rows}, "t")


def test_summary_footnotes_only_the_markers_it_shows():
  nan = float("nan")
  plain = _summary([60.0, 70.0, 80.0])
  assert "folds)" not in plain and "n/a" not in plain
  assert report.PARTIAL_NOTE not in plain
  assert report.UNDEFINED_NOTE not in plain
  partial = _summary([nan, 70.0, 80.0])
  assert "| 75.00 +- 7.07 (2/3 folds) |" in partial
  assert report.PARTIAL_NOTE in partial
  assert report.UNDEFINED_NOTE not in partial
  undefined = _summary([nan, nan, nan])
  assert "| n/a |" in undefined and report.UNDEFINED_NOTE in undefined
  assert report.PARTIAL_NOTE not in undefined
  # Each note its own paragraph, after the tables.
  assert undefined.endswith("\n\n" + report.UNDEFINED_NOTE + "\n")


def test_strict_json_and_readable_permissions(tmp_path):
  path = str(tmp_path / "fold0.json")
  report.write_json(path, {"test": {"uap": 0.5, "hor": float("nan")}})
  text = open(path).read()
  assert "NaN" not in text and '"hor": null' in text
  json.loads(text, parse_constant=lambda c: 1 / 0)  # Strict JSON.
  mask = os.umask(0)
  os.umask(mask)
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask  # Not 0600.


def test_predictions_round_trip(tmp_path):
  probs = np.random.default_rng(0).random((3, 10))
  path = str(tmp_path / "p.csv")
  report.write_predictions(path, ["a", "b", "c"], probs)
  ids, back = report.read_predictions(path)
  assert ids == ["a", "b", "c"]
  np.testing.assert_allclose(back, probs, atol=5e-7)
