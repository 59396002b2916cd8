"""End to end: `python -m divita_jax.main` on a tiny synthetic config."""

import json
import os

import pytest

from divita_jax import genres, report

pytestmark = pytest.mark.xdist_group("pipeline")


def test_main_writes_results(trained_workdir):
  results = os.path.join(trained_workdir, "results")
  for subset in ("val", "test"):
    rows = report.read_csv(os.path.join(results, f"{subset}.csv"))
    assert [r["fold"] for r in rows] == [0, 1, 2]
    for row in rows:
      assert 1 <= row["epoch"] <= 2
      for key in ("uap", "map", "wap", "sap"):
        assert 0 <= row[key] <= 100
  summary = open(os.path.join(results, "summary.md")).read()
  assert "| uap | map | wap | sap |" in summary and "+-" in summary
  probs = open(os.path.join(results, "fold0_test_probs.csv")).read()
  assert probs.splitlines()[0] == "id," + ",".join(genres.SHORT_NAMES)
  with open(os.path.join(trained_workdir, "config.json")) as f:
    assert json.load(f)["dataset"]["num_trailers"] == 24
  # TensorBoard events and checkpoints for every fold.
  for fold in range(3):
    files = os.listdir(os.path.join(trained_workdir, f"fold{fold}"))
    assert any(f.startswith("events.out.tfevents") for f in files), files
