"""Results tables: per-fold CSVs and the mean +- sample std summary."""

import numpy as np

from divita_jax import genres, report


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
  assert report.mean_std(rows, "hor") == "60.00 +- 14.14"
  assert report.mean_std([{"hor": float("nan")}], "hor") == "n/a"
