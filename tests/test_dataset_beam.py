"""The Beam build (FnApiRunner, multi-processing) equals the local build,
skips included; a killed pipeline redoes only what it had not finished;
the command line's own flags."""

import os
import subprocess
import sys

import numpy as np
import pytest

import tfds_trailers12k
from divita_jax import run
from divita_jax.configs import divita
from tests import kill_build, worker_fns
from tfds_trailers12k import dummy_data, workers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = "FnApiRunner"
# Two SDK worker processes, as on one host with a process per core.
MULTI = "--direct_num_workers=2,--direct_running_mode=multi_processing"
NUM = 6
BAD = ("bad_truncated", "bad_audio_only")  # Corrupt; no video stream.


def assert_same_dataset(a, b):
  """Same records in the same order, every feature, skips and index."""
  sa, sb = tfds_trailers12k.data_source(a), tfds_trailers12k.data_source(b)
  assert len(sa) == len(sb) > 0
  for i in range(len(sa)):
    x, y = sa[i], sb[i]
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=f"{x['id']} {k}")
  assert a.info.metadata["skipped"] == b.info.metadata["skipped"]
  ia, ib = tfds_trailers12k.load_index(a), tfds_trailers12k.load_index(b)
  assert sorted(ia) == sorted(ib)
  for k in ia:
    np.testing.assert_array_equal(ia[k], ib[k], err_msg=k)


def test_raw_beam_build_from_the_cli_equals_the_local_one(tmp_path):
  manual = str(tmp_path / "manual")
  dummy_data.write_raw(manual, num_good=3, extra_ids=[*BAD, "bad_missing"])
  bad = dummy_data.bad_videos()
  for mid in BAD:
    with open(os.path.join(manual, "videos", f"{mid}.mp4"), "wb") as f:
      f.write(bad[mid])
  local = tfds_trailers12k.build("raw", str(tmp_path / "local"), manual)
  cmd = [
    sys.executable,
    "-m",
    "tfds_trailers12k",
    "--config=raw",
    f"--manual_dir={manual}",
    f"--data_dir={tmp_path / 'beam'}",
    f"--beam_runner={RUNNER}",
    f"--beam_options={MULTI}",
  ]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
  assert out.returncode == 0, out.stderr[-3000:]
  beam = tfds_trailers12k.build("raw", str(tmp_path / "beam"), manual)
  assert not os.path.exists(beam._prepared_root)  # Cleaned up.
  skipped = [s["id"] for s in beam.info.metadata["skipped"]]
  assert skipped == ["bad_missing", *BAD]
  assert_same_dataset(local, beam)


def _killed_beam_build(data_dir, kwargs) -> int:
  """A Beam build (in-process FnApiRunner) killed after 2+ trailers;
  returns how many it saved."""
  code = (
    "import tfds_trailers12k as t; "
    f"t.build('synthetic', {data_dir!r}, beam_runner={RUNNER!r}, **{kwargs!r})"
  )
  folder = tfds_trailers12k.Trailers12k(
    config=tfds_trailers12k.make_config("synthetic", **kwargs),
    data_dir=data_dir,
  )._prepared_root
  return kill_build.kill_after_saved(code, folder)


def test_killed_beam_build_resumes_through_the_run_config(tmp_path, capsys):
  config = divita.get_config()
  config.dataset.num_trailers = NUM
  config.dataset.data_dir = str(tmp_path / "beam")
  config.dataset.beam_runner = RUNNER
  config.dataset.beam_options = MULTI
  kwargs = run.dataset_kwargs(config)
  local = tfds_trailers12k.build(
    "synthetic", str(tmp_path / "local"), num_workers=2, **kwargs
  )
  done = _killed_beam_build(config.dataset.data_dir, kwargs)
  assert 2 <= done < NUM, "killed too late to test a resume"
  capsys.readouterr()
  beam, index = run.ensure_dataset(config, str(tmp_path / "workdir"))
  # The pipeline's counters, in the build's summary: only the unfinished
  # trailers were redone.
  summary = capsys.readouterr().out
  assert f"{done} trailers prepared earlier, {NUM - done} now" in summary
  assert len(index["ids"]) == NUM
  assert_same_dataset(local, beam)


def test_a_crashing_trailer_is_a_skip_not_a_pipeline_failure(tmp_path):
  from tfds_trailers12k import beam  # noqa: PLC0415

  step = beam.Prepare(worker_fns.always_crash, str(tmp_path), False)
  step.setup()
  try:
    assert list(step.process(("tt1", None, {}))) == []  # Not yielded.
  finally:
    step.teardown()
  reason = step._store.reason("tt1")
  assert reason.startswith(workers.CRASHED), reason


def test_pipeline_options_split_before_each_flag():
  from tfds_trailers12k import beam  # noqa: PLC0415

  flags = "--direct_num_workers=2,--experiments=a,b --job_name=x"
  opts = beam.pipeline_options(flags).get_all_options()
  assert opts["direct_num_workers"] == 2 and opts["job_name"] == "x"
  # Not cut into a flag "b": the value reaches Beam whole (it splits
  # experiments at commas itself).
  assert opts["experiments"] == ["a", "b"]
  with pytest.raises(ValueError, match="'a=1' is not a flag"):
    beam.pipeline_options("a=1")


def test_help_lists_the_builders_flags_only():
  out = subprocess.run(
    [sys.executable, "-m", "tfds_trailers12k", "--help"],
    capture_output=True,
    text=True,
    cwd=REPO,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  for flag in (
    "--config",
    "--data_dir",
    "--manual_dir",
    "--retry_skipped",
    "--beam_runner",
    "--beam_options",
    "--helpfull",
  ):
    assert flag in out.stdout, flag
  assert "--register_checksums" not in out.stdout  # tfds build's own.
  assert len(out.stdout.splitlines()) < 40
