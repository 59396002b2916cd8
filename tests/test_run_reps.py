"""The Table-6 path: official zarr reps -> TFDS `reps` -> head -> results."""

import os

import numpy as np

from configs import divita
from divita_jax import report, run
from tfds_trailers12k import dummy_data


def test_run_on_official_reps(tmp_path):
  manual = str(tmp_path / "manual")
  clips = tuple(int(c) for c in np.random.default_rng(0).integers(2, 9, 30))
  dummy_data.write_reps(manual, num=30, clips=clips, features=(8, 6))
  config = divita.get_config("reps")
  config.dataset.manual_dir = manual
  config.folds = (0, 1)
  config.model.cam = "savg"
  config.train.num_clips = 4
  config.train.batch_size = 8
  config.train.eval_batch_size = 8
  config.train.max_epochs = 2
  workdir = str(tmp_path / "work")
  results = run.run(config, workdir)

  assert sorted(results) == [0, 1]
  rows = report.read_csv(os.path.join(workdir, "results", "test.csv"))
  assert [r["fold"] for r in rows] == [0, 1]
  assert not os.path.exists(os.path.join(workdir, "reps"))  # No extraction.
  # A rerun loads the finished folds instead of training again.
  again = run.run(config, workdir)
  assert again[1]["test"]["uap"] == results[1]["test"]["uap"]
