"""Shot detection on the synthetic trailers: accuracy, flashes, bad input."""

import dataclasses

import numpy as np
import pytest

from divita_jax import shots
from tfds_trailers12k import dummy_data, synthetic

# Small frames and many hard cases (dissolves, fades, flashes) per trailer.
HARD = dataclasses.replace(
  synthetic.SyntheticConfig(num_trailers=6, seed=3),
  height=48,
  width=64,
  min_seconds=6.0,
  max_seconds=9.0,
  dissolve_prob=0.15,
  fade_prob=0.1,
  flash_prob=0.5,
)


@pytest.fixture(scope="module")
def trailers():
  labels = synthetic.sample_labels(HARD)
  return [synthetic.make_trailer(i, HARD, labels[i]) for i in range(6)]


def _hard_cut_scores(trailer, detected, tol=2):
  """(tp, fp, fn) for hard cuts; cuts inside gradual transitions are ok."""
  true = shots.cuts_from_shots(trailer["true_shots"])
  kinds = np.array(trailer["kinds"])
  hard, soft = true[kinds == "hard"], true[kinds != "hard"]
  unmatched = list(hard)
  tp = fp = 0
  for c in detected:
    match = [h for h in unmatched if abs(h - c) <= tol]
    if match:
      unmatched.remove(match[0])
      tp += 1
    elif not any(abs(s - c) <= 4 + tol for s in soft):
      fp += 1
  return tp, fp, len(unmatched)


@pytest.mark.parametrize(
  "detector,downscale", [("content", 0), ("adaptive", 0), ("content", 2)]
)
def test_hard_cut_f1_and_flashes(trailers, detector, downscale):
  tp = fp = fn = num_flashes = flash_cuts = 0
  for t in trailers:
    cuts = shots.cuts_from_shots(
      shots.detect_shots(t["video"], detector=detector, downscale=downscale)
    )
    a, b, c = _hard_cut_scores(t, cuts)
    tp, fp, fn = tp + a, fp + b, fn + c
    num_flashes += len(t["flashes"])
    flash_cuts += sum(any(abs(c - f) <= 1 for c in cuts) for f in t["flashes"])
  f1 = 2 * tp / (2 * tp + fp + fn)
  assert tp >= 40 and num_flashes >= 5, (tp, num_flashes)  # Enough cases.
  assert f1 >= 0.95, (tp, fp, fn)
  if detector == "content":  # The documented default: flashes never cut.
    assert flash_cuts == 0


def test_flash_would_cut_without_suppression(trailers):
  # Guards the flash test above: the raw detector does fire on flashes.
  flash_cuts = 0
  for t in trailers:
    cuts = shots.cuts_from_shots(
      shots.detect_shots(t["video"], max_flash_len=0)
    )
    flash_cuts += sum(any(abs(c - f) <= 1 for c in cuts) for f in t["flashes"])
  assert flash_cuts >= 3


def test_shots_cover_video_in_order(trailers):
  t = trailers[0]
  r = shots.analyze(t["video"])
  assert r.shots.dtype == np.int32 and r.shots.shape[1] == 2
  assert r.shots[0, 0] == 0 and r.shots[-1, 1] == t["num_frames"]
  np.testing.assert_array_equal(r.shots[1:, 0], r.shots[:-1, 1])
  assert np.all(r.shots[:, 1] > r.shots[:, 0])
  assert (r.num_frames, r.height, r.width) == (t["num_frames"], 48, 64)
  assert r.fps == pytest.approx(24.0)


def test_min_shot_len_merges_short_shots(trailers):
  t = trailers[0]
  long = shots.detect_shots(t["video"], min_shot_len=40)
  assert np.all(np.diff(long[:-1], axis=1) >= 40)
  assert len(long) < len(shots.detect_shots(t["video"]))


def test_path_input_matches_bytes(trailers, tmp_path):
  path = tmp_path / "v.mp4"
  path.write_bytes(trailers[1]["video"])
  np.testing.assert_array_equal(
    shots.detect_shots(str(path)), shots.detect_shots(trailers[1]["video"])
  )


@pytest.mark.parametrize(
  "case,reason",
  [
    ("bad_empty", "empty file"),
    ("bad_garbage", "unreadable container"),
    ("bad_truncated", "unreadable container"),
    ("bad_audio_only", "no video stream"),
    ("bad_no_frames", "no decodable frames"),
  ],
)
def test_bad_input_reasons(case, reason):
  with pytest.raises(shots.VideoError) as e:
    shots.detect_shots(dummy_data.bad_videos()[case])
  assert e.value.reason.startswith(reason)


def test_missing_file_and_bad_settings(tmp_path):
  with pytest.raises(shots.VideoError, match="missing file"):
    shots.detect_shots(str(tmp_path / "nope.mp4"))
  with pytest.raises(ValueError, match="Unknown shot detector"):
    shots.ShotDetector("histogram")
  with pytest.raises(ValueError, match="min_shot_len"):
    shots.ShotDetector(min_shot_len=0)
