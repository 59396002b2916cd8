"""predict CLI on synthetic trailers of the shared tiny run's test subset."""

import json
import os
import subprocess
import sys
import time

import av
import matplotlib.image
import numpy as np
import pytest

import tfds_trailers12k
from divita_jax import predict, report
from tfds_trailers12k import genres

pytestmark = pytest.mark.xdist_group("pipeline")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trailers(trained_workdir, tmp_path_factory):
  """Two fold-0 test trailers written as files, plus their TFDS records."""
  config = predict.load_config(trained_workdir)
  builder = tfds_trailers12k.build(
    "synthetic",
    os.path.join(trained_workdir, "tfds"),
    num_trailers=config.dataset.num_trailers,
    seed=config.seed,
  )
  source = tfds_trailers12k.data_source(builder)
  index = tfds_trailers12k.load_index(builder)
  test = tfds_trailers12k.subset_indices(index["split_assignment"], 0, "test")
  folder = tmp_path_factory.mktemp("videos")
  records = {}
  for i in test[:2]:
    ex = source[int(i)]
    trailer_id = index["ids"][i]
    data = ex["video"]
    data = data.item() if isinstance(data, np.ndarray) else data
    (folder / f"{trailer_id}.mp4").write_bytes(data)
    records[trailer_id] = ex
  return str(folder), records


@pytest.fixture(scope="module")
def evaluated(trained_workdir):
  """id -> probabilities [10] that the evaluation wrote for fold 0 test."""
  path = os.path.join(trained_workdir, "results", "fold0_test_probs.csv")
  ids, probs = report.read_predictions(path)
  return dict(zip(ids, probs))


def test_cli_equals_evaluation_with_a_corrupt_and_a_missing_file(
  trained_workdir, trailers, evaluated
):
  """The real CLI: JSON in input order with an entry per failed file, exit
  code 1, probabilities equal to those the evaluation wrote (same shots,
  backbones, windows), and a quiet stderr: no TensorFlow or orbax notices,
  one warning that the run is synthetic."""
  folder, records = trailers
  bad = os.path.join(folder, "corrupt.mp4")
  missing = os.path.join(folder, "missing.mp4")
  good = sorted(os.path.join(folder, f"{i}.mp4") for i in records)
  with open(bad, "wb") as f:
    f.write(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
  try:
    proc = _predict(
      f"--workdir={trained_workdir}", "--json", good[0], bad, missing, good[1]
    )
  finally:
    os.remove(bad)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert f"error: {bad}:" in proc.stderr
  assert f"error: {missing}: missing file" in proc.stderr
  assert "2 of 4 file(s) failed" in proc.stderr
  _assert_quiet(proc.stderr)
  out = json.loads(proc.stdout)
  assert [o["path"] for o in out] == [good[0], bad, missing, good[1]]
  assert out[2] == {"path": missing, "error": "missing file"}
  assert set(out[1]) == {"path", "error"} and out[1]["error"]
  out = [out[0], out[3]]
  # Distinct trailers get distinct probabilities: equality is not trivial.
  a, b = (evaluated[i] for i in sorted(records))
  assert np.abs(a - b).max() > 1e-3
  for o in out:
    assert set(o) == {
      *("id", "path", "genres", "shots", "fps", "num_frames"),
      *("branches", "silence"),
    }
    assert list(o["genres"]) == list(genres.GENRES)
    assert list(o["branches"]) == ["image", "video"] and o["silence"] == ""
    # The fused logits are the mean of the branches' logits.
    for g in genres.GENRES:
      logit = lambda p: np.log(p / (1 - p))
      alone = [logit(o["branches"][b][g]) for b in ("image", "video")]
      assert logit(o["genres"][g]) == pytest.approx(np.mean(alone), abs=1e-2)
    ex = records[o["id"]]
    assert o["shots"] == ex["shots"].tolist()
    assert o["num_frames"] == int(ex["num_frames"])
    assert o["fps"] == pytest.approx(float(ex["fps"]), rel=1e-5)
    probs = [o["genres"][g] for g in genres.GENRES]
    np.testing.assert_allclose(probs, evaluated[o["id"]], atol=1e-5, rtol=0)


def _predict(*args: str) -> subprocess.CompletedProcess:
  """`python -m divita_jax.predict ARGS`, stderr not a terminal."""
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  return subprocess.run(
    [sys.executable, "-m", "divita_jax.predict", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env=env,  # Not quieted by conftest: predict must quiet TensorFlow.
  )


def _assert_quiet(stderr: str) -> None:
  """Only our lines: errors, the synthetic-run warning, the failure count."""
  lines = stderr.strip().splitlines()
  assert lines, stderr
  for line in lines:
    assert line.startswith(("error: ", "warning: ", "1 ", "2 ")), stderr
  assert "\x1b" not in stderr and "\r" not in stderr  # No progress bar.
  (warning,) = [line for line in lines if line.startswith("warning: ")]
  assert "trained on synthetic trailers (dataset.config='synthetic')" in (
    warning
  )
  assert "randomly initialised backbones" in warning


def test_a_missing_file_fails_at_once(trained_workdir, tmp_path):
  """Nothing is loaded for a missing file: the answer comes in seconds
  (the run's libraries take ~20 s to import and load)."""
  missing = str(tmp_path / "missing.mp4")
  start = time.time()
  proc = _predict(f"--workdir={trained_workdir}", missing)
  seconds = time.time() - start
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert f"error: {missing}: missing file" in proc.stderr
  assert "1 of 1 file(s) failed" in proc.stderr
  _assert_quiet(proc.stderr)
  assert seconds < 5, seconds


def test_table_and_plot(trained_workdir, trailers, tmp_path, capsys):
  folder, records = trailers
  trailer_id = sorted(records)[0]
  png = str(tmp_path / "pred.png")
  rc = predict.main(
    [
      os.path.join(folder, f"{trailer_id}.mp4"),
      f"--workdir={trained_workdir}",
      f"--plot={png}",
      "--no_progress",
    ]
  )
  out = capsys.readouterr().out
  assert rc == 0
  lines = out.strip().splitlines()
  assert lines[0].startswith(trailer_id)
  num_shots = len(records[trailer_id]["shots"])
  assert lines[1].strip().startswith(f"{num_shots} shots, ")
  rows = [line[2:].split() for line in lines[3:-1]]
  assert sorted(r[0] for r in rows) == sorted(genres.GENRES)
  probs = [float(r[1]) for r in rows]
  assert probs == sorted(probs, reverse=True)
  assert lines[2].split()[:4] == ["genre", "prob", "image", "video"]
  assert all(0 <= float(r[k]) <= 1 for r in rows for k in (2, 3))
  # '*' marks genres at or above 0.5.
  assert [line[0] == "*" for line in lines[3:-1]] == [p >= 0.5 for p in probs]
  assert lines[-1].strip().startswith("* = predicted genre: prob >= 0.5")
  assert "branch columns: each branch alone" in lines[-1]
  image = matplotlib.image.imread(png)
  assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 600
  assert image[..., :3].std() > 0.05  # Thumbnails and bars, not blank.


def test_bad_workdir_and_fold(trained_workdir, tmp_path, capsys):
  assert predict.main(["x.mp4", f"--workdir={tmp_path}"]) == 2
  err = capsys.readouterr().err
  assert "config.json is missing" in err and str(tmp_path) in err
  rc = predict.main(["x.mp4", f"--workdir={trained_workdir}", "--fold=5"])
  assert rc == 2
  err = capsys.readouterr().err
  assert "Fold 5 was not trained" in err and "fold0" in err


def test_empty_folder_fails_before_loading(tmp_path, capsys):
  assert predict.main([str(tmp_path), "--workdir=/nonexistent"]) == 2
  err = capsys.readouterr().err
  assert f"Folder {tmp_path} holds no video files" in err


def test_audio_run_predicts_files_with_and_without_sound(
  audio_workdir, trained_workdir, trailers, tmp_path, capsys
):
  """An audio_only run hears the file's soundtrack (probabilities equal
  those its evaluation wrote) and, for the same video without an audio
  stream, silence: other probabilities, and the table says so."""
  folder, records = trailers
  trailer_id = sorted(records)[0]
  sound = os.path.join(folder, f"{trailer_id}.mp4")
  mute = str(tmp_path / f"{trailer_id}_mute.mp4")
  with av.open(sound) as src, av.open(mute, "w") as dst:
    out = dst.add_stream_from_template(src.streams.video[0])
    for packet in src.demux(src.streams.video[0]):
      if packet.dts is not None:
        packet.stream = out
        dst.mux(packet)
  args = [f"--workdir={audio_workdir}", "--no_progress"]
  assert predict.main([sound, mute, *args, "--json"]) == 0
  heard, silent = json.loads(capsys.readouterr().out)
  path = os.path.join(audio_workdir, "results", "fold0_test_probs.csv")
  evaluated = dict(zip(*report.read_predictions(path)))
  probs = [heard["genres"][g] for g in genres.GENRES]
  np.testing.assert_allclose(probs, evaluated[trailer_id], atol=1e-5, rtol=0)
  assert heard["silence"] == "" and heard["branches"] == {}
  assert silent["silence"] == "no audio stream"
  assert silent["shots"] == heard["shots"]
  other = [silent["genres"][g] for g in genres.GENRES]
  assert np.abs(np.subtract(other, probs)).max() > 1e-3
  assert predict.main([mute, *args]) == 0
  table = capsys.readouterr().out
  assert "audio branch: silence (no audio stream)" in table.splitlines()[1]
