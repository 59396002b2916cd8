"""What `python -m divita_jax.main` prints: a short console for a whole run,
and one line for a wrong input before anything is written."""

import logging
import os
import subprocess
import sys

import pytest

from divita_jax import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.xdist_group("pipeline")
def test_a_run_prints_a_line_per_stage(trained_workdir):
  """The shared tiny run (dataset, extraction, three folds), stderr not a
  terminal: a summary line instead of the config, one line per stage, the
  results table; no progress bars, parameter tables or library notices."""
  with open(f"{trained_workdir}.console.txt") as f:
    console = f.read()
  lines = console.strip().splitlines()
  assert len(lines) <= 40, console
  assert "\x1b" not in console and "\r" not in console  # No tqdm bars.
  assert lines[0].startswith("divita_jax.main: configs/divita.py:runlocal")
  assert f"workdir {trained_workdir} " in lines[0]
  quiet = (
    "Config:",
    "dataset_info.json",
    "custom data configuration",
    "Downloading and preparing",
    "downloaded and prepared",
  )
  for notice in quiet:
    assert notice not in console, notice
  assert "Epoch 1:" not in console and "parameters" not in console
  stages = [
    ": 48 trailers in ",  # The build's summary.
    "Extracted ",
    "Fold 0 (best epoch",
    "Fold 1 (best epoch",
    "Fold 2 (best epoch",
    "## test (folds 0, 1, 2",
  ]
  for stage in stages:
    assert sum(stage in line for line in lines) == 1, (stage, console)


def test_reps_without_mtgc_is_one_line_before_the_workdir(tmp_path):
  manual, workdir = tmp_path / "manual", tmp_path / "work"
  manual.mkdir()
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "divita_jax.main",
      "--config=configs/divita.py:reps",
      f"--config.dataset.manual_dir={manual}",
      f"--workdir={workdir}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 1
  assert proc.stderr.strip() == (
    f"divita_jax.main: error: {manual}/mtgc.csv not found: the dataset's "
    "labels and folds (the official Trailers12k mtgc.csv) go in "
    "config.dataset.manual_dir."
  )
  assert proc.stdout == ""
  assert not workdir.exists()


def _record(path: str, level: int, msg: str, *args) -> logging.LogRecord:
  return logging.LogRecord("absl", level, path, 1, msg, args, None)


def test_quiet_libraries_and_verbosity():
  """Verbosity 0 drops the libraries' notices and INFO that is not a stage
  line (keeping warnings and errors); verbosity 1 keeps everything."""
  tfds = "/site-packages/tensorflow_datasets/core/utils/file_utils.py"
  dropped = [
    _record(
      tfds,
      logging.WARNING,
      "Variant folder %s has no %s",
      "v",
      "dataset_info.json",
    ),
    _record("/site-packages/orbax/checkpoint/a.py", logging.WARNING, "ro"),
    _record("/repo/divita_jax/trainers/loop.py", logging.INFO, "Epoch 1"),
  ]
  kept = [
    _record(tfds, logging.WARNING, "Something else"),
    _record("/site-packages/orbax/checkpoint/a.py", logging.ERROR, "lost"),
    _record("/repo/divita_jax/trainers/loop.py", logging.WARNING, "NaN"),
    _record("/repo/divita_jax/run.py", logging.INFO, "Fold 0 (best epoch 3)"),
    _record(
      "/repo/divita_jax/trainers/loop.py",
      logging.INFO,
      "Fold %d: resuming at step %d (%d epochs done).",
      0,
      12,
      1,
    ),
  ]
  quiet, verbose = main.QuietLibraries(0), main.QuietLibraries(1)
  assert [quiet.filter(r) for r in dropped + kept] == [False] * 3 + [True] * 5
  assert all(verbose.filter(r) for r in dropped + kept)
  assert main.argv_verbosity(["x", "--verbosity=1"]) == 1
  assert main.argv_verbosity(["x", "-v", "2"]) == 2
  assert main.argv_verbosity(["x", "--verbosity=-1"]) == -1
  assert main.argv_verbosity(["x", "--workdir=v"]) == 0
