"""The Table-6 path: TFDS `reps` (labels, folds) + official zarr reps read in
place -> head -> results; a rerun trains nothing."""

import glob
import os
import shutil

import numpy as np

from divita_jax import report, run
from divita_jax.configs import divita
from divita_jax.trainers import loop
from tfds_trailers12k import dummy_data


def _mtimes(workdir):
  files = glob.glob(os.path.join(workdir, "fold*", "**"), recursive=True)
  files += glob.glob(os.path.join(workdir, "results", "fold*"))
  return {f: os.stat(f).st_mtime_ns for f in files if os.path.isfile(f)}


def test_run_on_official_reps(tmp_path, monkeypatch):
  manual = str(tmp_path / "manual")
  clips = tuple(int(c) for c in np.random.default_rng(0).integers(2, 9, 30))
  ids = dummy_data.write_reps(manual, num=30, clips=clips, features=(8, 6))
  # A trailer without video representations is dropped by the run.
  shutil.rmtree(os.path.join(manual, dummy_data.REPS_GROUPS[1], ids[0]))
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
  (features,) = glob.glob(f"{workdir}/tfds/**/features.json", recursive=True)
  with open(features) as f:
    assert "float32" not in f.read()  # Labels, folds, metadata: no reps.
  predicted = set()
  for fold in (0, 1):
    for subset in ("val", "test"):
      path = os.path.join(workdir, "results", f"fold{fold}_{subset}_probs.csv")
      with open(path) as f:
        predicted |= {line.split(",")[0] for line in f.readlines()[1:]}
  assert ids[0] not in predicted and ids[1] in predicted

  # A rerun loads the finished folds: no training step, no file rewritten.
  before = _mtimes(workdir)
  assert any("checkpoint" in f or "best" in f for f in before)

  def no_training(*args, **kwargs):
    raise AssertionError("The rerun trained a fold.")

  monkeypatch.setattr(loop, "train_fold", no_training)
  again = run.run(config, workdir)
  assert _mtimes(workdir) == before
  assert again == results
