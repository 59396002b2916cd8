"""A workdir belongs to one config; mistakes are caught before any work."""

import os
import subprocess
import sys

import pytest

from divita_jax import workdir
from divita_jax.configs import checks, divita


def test_config_differences_ignore_fields_that_cannot_change_results():
  old = divita.get_config()
  new = divita.get_config()
  new.mesh.shape = (2, -1)
  new.backbones.video.batch_size = 4
  new.train.log_every_steps = 7
  new.folds = (0,)
  assert workdir.config_differences(old.to_dict(), new) == []
  new.model.cam = "savg"
  new.dataset.min_shot_len = 3
  diffs = workdir.config_differences(old.to_dict(), new.to_dict())
  assert diffs == [
    "dataset.min_shot_len: 6 -> 3",
    "model.cam: 'tsfm_128_4_6_0.25' -> 'savg'",
  ]


def test_a_branch_in_neither_run_is_ignored_and_adding_audio_differs():
  """A config.json written before the audio fields existed still matches
  a two-branch run; adding the audio branch to it is a difference."""
  old = divita.get_config().to_dict()
  del old["backbones"]["audio"], old["clips"]["audio_seconds"]
  assert workdir.config_differences(old, divita.get_config()) == []
  audio = divita.get_config("audio")
  diffs = workdir.config_differences(old, audio)
  assert (
    "model.branches: ['image', 'video'] -> ['image', 'video', 'audio']"
    in (diffs)
  )
  assert "backbones.audio.kind: '<absent>' -> 'ast'" in diffs
  image_only = divita.get_config("image_only")
  image_only.backbones.video.variant = "B/16"  # Not used by the run.
  assert (
    workdir.config_differences(
      divita.get_config("image_only").to_dict(), image_only
    )
    == []
  )


def test_other_config_is_an_error_and_overwrite_moves_results_aside(tmp_path):
  config = divita.get_config()
  work = str(tmp_path / "work")
  os.makedirs(os.path.join(work, "fold0", "best"))
  open(os.path.join(work, "fold0", "best", "x"), "w").close()
  os.makedirs(os.path.join(work, "tfds"))
  workdir.write_config(config, work)
  workdir.check_config(config, work)  # Same config: fine.
  other = divita.get_config()
  other.model.cam = "savg"
  with pytest.raises(workdir.WorkdirError, match=r"model\.cam.*--overwrite"):
    workdir.check_config(other, work)
  assert sorted(os.listdir(work)) == ["config.json", "fold0", "tfds"]
  workdir.check_config(other, work, overwrite=True)
  (previous,) = [d for d in os.listdir(work) if d.startswith("previous-")]
  assert sorted(os.listdir(work)) == [previous, "tfds"]  # Cache kept.
  kept = os.path.join(work, previous, "fold0", "best", "x")
  assert os.path.exists(kept)  # Moved, not deleted.
  assert (
    oct(os.stat(os.path.join(work, previous, "config.json")).st_mode)[-3:]
    == oct(0o666 & ~_umask())[-3:]
  )


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def test_preflight_errors_name_the_setting(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = divita.get_config()
  with pytest.raises(workdir.WorkdirError, match="not a local path"):
    workdir.preflight(config, "gs://bucket/run")
  assert not os.path.exists(tmp_path / "gs:")  # No local look-alike.
  (tmp_path / "file").write_text("")
  with pytest.raises(workdir.WorkdirError, match="not a directory"):
    workdir.preflight(config, str(tmp_path / "file"))
  raw = divita.get_config("trailers12k")
  with pytest.raises(checks.ConfigError, match="dataset.manual_dir=DIR"):
    workdir.preflight(raw, str(tmp_path / "w"))
  raw.dataset.manual_dir = str(tmp_path)
  with pytest.raises(workdir.WorkdirError, match="backbones.image.checkpoint"):
    workdir.preflight(raw, str(tmp_path / "w"))
  config.train.batch_size = 3  # 8 fake devices on the data axis.
  with pytest.raises(ValueError, match="config.train.batch_size=3"):
    workdir.preflight(config, str(tmp_path / "w"))
  assert sorted(os.listdir(tmp_path)) == ["file"]  # Nothing was created.


def _main(*flags, cwd):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run(
    [sys.executable, "-m", "divita_jax.main", *flags],
    cwd=root,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_main_user_mistakes_are_one_line_errors(tmp_path):
  config = "--config=configs/divita.py"
  out = _main(
    config, "--config.model.camm=x", f"--workdir={tmp_path}/w", cwd=tmp_path
  )
  assert out.returncode != 0 and "Traceback" not in out.stderr
  assert (
    "unknown config field" in out.stderr and 'Did you mean "cam"' in out.stderr
  )
  (tmp_path / "file").write_text("")
  out = _main(config, f"--workdir={tmp_path}/file", cwd=tmp_path)
  assert out.returncode != 0 and "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1].endswith("is not a directory.")
  # A bad value fails before anything is built or written (checks.py).
  out = _main(
    config,
    "--config.train.val_loss=foo",
    f"--workdir={tmp_path}/w",
    cwd=tmp_path,
  )
  assert out.returncode != 0 and "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1] == (
    "divita_jax.main: error: config.train.val_loss='foo': expected "
    "windows | trailers"
  )
  assert "Config:" not in out.stdout and not os.path.exists(tmp_path / "w")
