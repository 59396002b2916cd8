"""`python -m divita_jax.study`: grids of runs, shared extraction, resume,
the table; bad grids fail before any work."""

import csv
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from divita_jax import report, study, study_report
from divita_jax.configs import divita

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The smallest runs: 10 trailers (one fold group), the image branch, 2 of
# the 3 folds (the paired deltas have 2 folds), 1 epoch.
FLAGS = (
  "--config=configs/divita.py:runlocal,image_only",
  "--config.dataset.num_trailers=10",
  "--config.folds=(0,1)",
  "--config.train.max_epochs=1",
  "--config.train.batch_size=8",
  "--config.train.num_clips=8",
)
# clips.fps changes the representations, model.cam only the head.
GRID = "--grid=clips.fps=4,8;model.cam=savg,conv_3_128"
BASELINE = "--baseline=clips.fps=8,model.cam=savg"
SETTINGS = [
  "clips.fps=4,model.cam=savg",
  "clips.fps=4,model.cam=conv_3_128",
  "clips.fps=8,model.cam=savg",
  "clips.fps=8,model.cam=conv_3_128",
]
_EXTRACTED = re.compile(r"Extraction: (\d+) of \d+ trailers left")


def _command(workdir, grid=GRID, baseline=BASELINE):
  flags = [*FLAGS, grid, *[baseline] * bool(baseline), f"--workdir={workdir}"]
  return [sys.executable, "-m", "divita_jax.study", *flags]


def _fails(workdir, grid) -> str:
  """The last line of a study that exits with 1."""
  proc = subprocess.run(
    _command(workdir, grid, baseline=""), cwd=ROOT, capture_output=True,
    text=True, timeout=120,
  )  # fmt: skip
  assert proc.returncode == 1, proc.stderr[-3000:]
  return proc.stderr.strip().splitlines()[-1]


def _run(workdir) -> str:
  proc = subprocess.run(
    _command(workdir), cwd=ROOT, capture_output=True, text=True,
    timeout=600,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-5000:]
  return proc.stdout + proc.stderr


def _extracted(output: str) -> int:
  """Trailers extracted (summed over branches' extraction passes)."""
  return sum(int(n) for n in _EXTRACTED.findall(output))


def _results_mtimes(workdir) -> dict:
  files = glob.glob(os.path.join(workdir, "*", "results", "*"))
  files += glob.glob(os.path.join(workdir, "reps", "*", "*", "*.npy"))
  return {f: os.stat(f).st_mtime_ns for f in files}


def test_study_runs_resumes_and_reports(tmp_path):
  workdir = str(tmp_path / "study")
  # Killed once the first setting has finished.
  proc = subprocess.Popen(
    _command(workdir), cwd=ROOT, stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT, text=True,
  )  # fmt: skip
  first = os.path.join(workdir, SETTINGS[0], "results", "test.csv")
  deadline = time.time() + 300
  while not os.path.exists(first) and proc.poll() is None:
    assert time.time() < deadline, "the first setting did not finish"
    time.sleep(0.2)
  assert proc.poll() is None, "the study ended before it was killed"
  proc.send_signal(signal.SIGKILL)
  killed_output = proc.communicate()[0]
  first_mtime = os.stat(first).st_mtime_ns
  assert not os.path.exists(os.path.join(workdir, SETTINGS[-1], "results"))
  # --report aggregates what is finished: the first setting.
  st = study.plan(_flags_config(), workdir, GRID[7:], BASELINE[11:])
  results = study_report.write(st, workdir)
  assert results[SETTINGS[0]]["state"] == "done"
  assert results[SETTINGS[-1]]["state"] == "not finished"
  md = open(os.path.join(workdir, "study.md")).read()
  assert "| 8 | conv_3_128 | not finished |" in md

  resumed = _run(workdir)
  assert f"[study 1/4] {SETTINGS[0]}: finished, skipped." in resumed
  assert os.stat(first).st_mtime_ns == first_mtime  # Not run again.
  # Every setting ran; settings differing in the CAM only shared the
  # extraction: 2 groups of 10 trailers, each extracted once.
  assert sorted(os.listdir(os.path.join(workdir, "reps"))) == sorted(
    {_reps_group(workdir, s) for s in SETTINGS}
  )
  assert len(os.listdir(os.path.join(workdir, "reps"))) == 2
  assert _extracted(killed_output + resumed) == 2 * 10
  npys = glob.glob(os.path.join(workdir, "reps", "*", "*", "*.npy"))
  assert len(npys) == 2 * 10

  # A rerun does nothing.
  before = _results_mtimes(workdir)
  rerun = _run(workdir)
  assert rerun.count("finished, skipped.") == 4 and "running in" not in rerun
  assert _extracted(rerun) == 0
  assert _results_mtimes(workdir) == before

  # The table's numbers are the settings' own results/test.csv.
  with open(os.path.join(workdir, "study.csv")) as f:
    rows = {r["setting"]: r for r in csv.DictReader(f)}
  assert list(rows) == SETTINGS
  md = open(os.path.join(workdir, "study.md")).read()
  base = report.read_csv(
    os.path.join(workdir, "clips.fps=8,model.cam=savg", "results", "test.csv")
  )
  for name in SETTINGS:
    test = report.read_csv(os.path.join(workdir, name, "results", "test.csv"))
    assert [r["fold"] for r in test] == [0, 1]
    row = rows[name]
    assert row["state"] == "done" and row["folds"] == "2"
    for m in ("uap", "map", "wap", "sap"):
      values = [r[m] for r in test if np.isfinite(r[m])]
      assert float(row[f"test_{m}"]) == pytest.approx(np.mean(values), abs=1e-4)
    diffs = [a["uap"] - b["uap"] for a, b in zip(test, base)]
    assert float(row["delta_uap"]) == pytest.approx(np.mean(diffs), abs=1e-4)
    assert row["delta_folds"] == "2"
    fps, cam = (part.split("=")[1] for part in name.split(","))
    cells = " | ".join(report.mean_std(test, m) for m in ("uap", "map"))
    assert f"| {fps} | {cam} | {cells} |" in md, (name, md)
  assert os.path.getsize(os.path.join(workdir, "study.png")) > 1000


def _reps_group(workdir, setting) -> str:
  """The extraction group folder (under DIR/reps) of a setting's run."""
  with open(os.path.join(workdir, setting, "config.json")) as f:
    return os.path.basename(json.load(f)["reps"]["dir"])


def _flags_config():
  """The config of FLAGS, built in this process."""
  config = divita.get_config("runlocal,image_only")
  config.dataset.num_trailers = 10
  config.folds = (0, 1)
  config.train.max_epochs = 1
  config.train.batch_size = 8
  config.train.num_clips = 8
  config.lock()
  return config


def _base():
  config = divita.get_config("runlocal")
  config.lock()
  return config


@pytest.mark.parametrize(
  "grid, baseline, error",
  [
    ("clips.fpz=4,8", "", "unknown config field 'clips.fpz' (did you mean "
     "clips.fps?)"),
    ("clips.fps=4,fast", "", "clips.fps='fast': expected a float"),
    ("clips.fps=4,8;model.cam=", "", "--grid axis 'model.cam' has no values"),
    ("clips.fps=4,8", "clips.fps=6", "--baseline clips.fps='6' is not in the "
     "grid (4, 8)"),
    ("clips.fps=4,8;model.cam=savg", "model.cam=savg", "--baseline "
     "'model.cam=savg' names no value of axis 'clips.fps'"),
    ("model.cam=savg,tsfm_1", "", "setting model.cam=tsfm_1: config.model."
     "cam='tsfm_1'"),
  ],
)  # fmt: skip
def test_bad_grids(grid, baseline, error, tmp_path):
  with pytest.raises(study.StudyError) as e:
    study.plan(_base(), str(tmp_path), grid, baseline)
  assert str(e.value).startswith(error), str(e.value)
  assert not os.listdir(tmp_path)


def test_bad_grid_fails_before_any_work(tmp_path):
  """Batch sizes are checked on the run's 8 devices before any work."""
  workdir = tmp_path / "study"
  last = _fails(workdir, "--grid=train.batch_size=8,12")
  assert last.startswith(
    "divita_jax.study: error: setting train.batch_size=12: "
    "config.train.batch_size=12: expected a multiple of 8"
  ), last
  assert not workdir.exists()


def test_failed_settings_are_reported_and_others_go_on(tmp_path):
  """Both settings' folders hold another config's results: each fails
  (workdir rules), the second is still tried, both are in the table."""
  workdir = tmp_path / "study"
  names = ("model.cam=savg", "model.cam=conv_3_128")
  for name in names:
    (workdir / name).mkdir(parents=True)
    (workdir / name / "config.json").write_text('{"seed": 5}')
  last = _fails(workdir, "--grid=model.cam=savg,conv_3_128")
  assert last.startswith("divita_jax.study: 2 setting(s) failed: "), last
  md = (workdir / "study.md").read_text()
  for name in names:
    assert f"{name}: WorkdirError: {workdir / name} holds the results" in last
    assert (workdir / name / study_report.FAILED_FILE).exists()
    cam = name.split("=")[1]
    assert f"| {cam} | failed: WorkdirError: " in md
  assert not (workdir / "tfds").exists()  # Nothing was built.


def test_named_studies_and_shards():
  config = _base()
  st = study.plan(config, "/tmp/unused", "", "", "segmentation",
                  study.FLAGS["studies_file"].default)  # fmt: skip
  assert len(st.settings) == 4
  assert st.baseline_name() == "clips.segmentation=fixed,input=image"
  assert [c["paper"] for c in st.claims] == [1.83, 3.75]
  assert st.claims[1]["reference"] == ["clips.segmentation=fixed,input=video"]
  # Head-only axes share the representations.
  st = study.plan(config, "/tmp/unused", "", "", "spatiotemporal",
                  study.FLAGS["studies_file"].default)  # fmt: skip
  assert len(st.settings) == 16
  assert len({c.reps.dir for c in st.configs.values()}) == 1
  st = study.plan(config, "/tmp/unused", "", "", "input_extension",
                  study.FLAGS["studies_file"].default)  # fmt: skip
  assert len({c.reps.dir for c in st.configs.values()}) == 2  # clips/shot
  names = st.names()
  shards = [names[i::3] for i in range(3)]
  assert sorted(sum(shards, [])) == sorted(names)
  assert study.parse_shard("2/3") == (2, 3)
  with pytest.raises(study.StudyError, match="expected I/N"):
    study.parse_shard("3/3")
  delta = study_report.paired_delta(
    [{"fold": 0, "uap": 50.0}, {"fold": 2, "uap": 40.0}],
    [
      {"fold": 0, "uap": 45.0},
      {"fold": 1, "uap": 30.0},
      {"fold": 2, "uap": 41.0},
    ],
  )
  assert delta["per_fold"] == {0: 5.0, 2: -1.0} and delta["n"] == 2
  assert delta["mean"] == 2.0
