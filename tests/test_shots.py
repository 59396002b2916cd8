"""Shot detection on the synthetic trailers: accuracy, flashes, bad input,
and the fast path against PySceneDetect fed frame by frame."""

import dataclasses
import io
import json
import subprocess
import sys

import av
import cv2
import numpy as np
import pytest
from scenedetect.common import FrameTimecode
from scenedetect.detectors import AdaptiveDetector, ContentDetector
from scenedetect.stats_manager import StatsManager

from tfds_trailers12k import cut_rules, dummy_data, shots, synthetic

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


@pytest.fixture(scope="module")
def noisy_video():
  """640x360 H.264 of upscaled synthetic shots plus camera-like noise.

  Big enough to be shrunk (the scaled swscale path) and noisy enough that
  hue jitters and many scores land between 0 and the thresholds.
  """
  cfg = dataclasses.replace(HARD, height=90, width=160, min_seconds=3.0)
  cfg = dataclasses.replace(cfg, max_seconds=3.0)
  frames, _, _, _ = synthetic.render_frames(1, cfg, np.eye(10, dtype=int)[0])
  rng = np.random.default_rng(0)
  buf = io.BytesIO()
  with av.open(buf, mode="w", format="mp4") as out:
    stream = out.add_stream("libx264", rate=24)
    stream.height, stream.width, stream.pix_fmt = 360, 640, "yuv420p"
    stream.options = {"preset": "ultrafast", "crf": "23"}
    for img in frames:
      big = cv2.resize(img, (640, 360), interpolation=cv2.INTER_LINEAR)
      noise = rng.integers(-10, 11, big.shape, dtype=np.int16)  # Std ~6.
      big = np.clip(big + noise, 0, 255)
      frame = av.VideoFrame.from_ndarray(big.astype(np.uint8), "rgb24")
      out.mux(stream.encode(frame))
    out.mux(stream.encode(None))
  return buf.getvalue()


@pytest.fixture(scope="module")
def static_video():
  """Four flat shots: all scores 0 but at cuts (AdaptiveDetector's
  zero-mean window case)."""
  buf = io.BytesIO()
  with av.open(buf, mode="w", format="mp4") as out:
    stream = out.add_stream("libx264", rate=24)
    stream.height, stream.width, stream.pix_fmt = 48, 64, "yuv420p"
    stream.options = {"preset": "ultrafast", "crf": "23"}
    for color in [(200, 40, 40), (40, 160, 220), (90, 200, 60), (20, 20, 20)]:
      img = np.full((48, 64, 3), color, np.uint8)
      for _ in range(12):
        out.mux(stream.encode(av.VideoFrame.from_ndarray(img, "rgb24")))
    out.mux(stream.encode(None))
  return buf.getvalue()


def _pyscenedetect(video: bytes, detector: str, downscale: int):
  """The straightforward way: BGR frames from `to_ndarray` (a fresh swscale
  context per frame) fed one by one to PySceneDetect's detector.

  Returns (frames, scores, raw cuts); scores are its `content_val`.
  """
  if detector == "content":
    det = ContentDetector(threshold=27.0, min_scene_len=0)
  else:
    det = AdaptiveDetector(adaptive_threshold=3.0, min_scene_len=1)
  det.stats_manager = StatsManager()
  frames, timecodes, cuts = [], [], []
  with av.open(io.BytesIO(video)) as c:
    for i, f in enumerate(c.decode(video=0)):
      w, h = shots.downscale_size(f.width, f.height, downscale)
      frames.append(
        f.to_ndarray(width=w, height=h, format="bgr24", interpolation="POINT")
      )
      timecodes.append(FrameTimecode(i, fps=24.0))
      cuts += [
        t.frame_num for t in det.process_frame(timecodes[-1], frames[-1])
      ]
  get = det.stats_manager.get_metrics
  scores = [0.0] + [get(t, ["content_val"])[0] for t in timecodes[1:]]
  return frames, scores, cuts


@pytest.mark.parametrize("downscale", [0, 3])  # 2x, and 640 / 213 px.
def test_fast_path_scores_equal_pyscenedetect(noisy_video, downscale):
  want_frames, want_scores, want_cuts = _pyscenedetect(
    noisy_video, "content", downscale
  )
  shrink = shots.Shrinker(downscale)
  with av.open(io.BytesIO(noisy_video)) as c:
    frames = [shrink(f) for f in c.decode(video=0)]
  assert len(frames) == len(want_frames)
  for got, want in zip(frames, want_frames):
    np.testing.assert_array_equal(got, want)  # Same swscale arithmetic.
  hsv = [cv2.cvtColor(b, cv2.COLOR_BGR2HSV) for b in frames]
  scores = [0.0] + [cut_rules.content_score(a, b) for a, b in zip(hsv, hsv[1:])]
  assert scores == want_scores  # Bit for bit, not approximately.
  # The test has teeth: cuts, and many scores neither ~0 nor above 27.
  assert len(want_cuts) >= 4
  assert sum(3 < x < 27 for x in scores) >= 20
  raw = shots.detect_shots(
    noisy_video, downscale=downscale, max_flash_len=0, min_shot_len=1
  )
  assert cut_rules.cuts_from_shots(raw).tolist() == want_cuts


@pytest.mark.parametrize("detector", ["content", "adaptive"])
def test_raw_cuts_equal_pyscenedetect(
  noisy_video, static_video, trailers, detector
):
  # Hard synthetic trailers: dissolves, fades and flashes near thresholds.
  videos = [noisy_video, static_video] + [t["video"] for t in trailers[:2]]
  for video in videos:
    _, _, want = _pyscenedetect(video, detector, 0)
    raw = shots.detect_shots(
      video, detector=detector, max_flash_len=0, min_shot_len=1
    )
    assert cut_rules.cuts_from_shots(raw).tolist() == want
    assert len(want) >= 3


def _hard_cut_scores(trailer, detected, tol=2):
  """(tp, fp, fn) for hard cuts; cuts inside gradual transitions are ok."""
  true = cut_rules.cuts_from_shots(trailer["true_shots"])
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
    cuts = cut_rules.cuts_from_shots(
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
    cuts = cut_rules.cuts_from_shots(
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
    cut_rules.ShotDetector("histogram")
  with pytest.raises(ValueError, match="min_shot_len"):
    cut_rules.ShotDetector(min_shot_len=0)


@pytest.mark.parametrize("detector", ["content", "adaptive"])
def test_scores_are_what_the_detector_thresholds(noisy_video, detector):
  r = shots.analyze(noisy_video, detector=detector, max_flash_len=0)
  raw = shots.analyze(
    noisy_video, detector=detector, min_shot_len=1, max_flash_len=0
  )
  assert r.scores.shape == (r.num_frames,)
  cuts = cut_rules.cuts_from_shots(raw.shots)
  above = np.flatnonzero(r.scores >= cut_rules.DEFAULT_THRESHOLDS[detector])
  if detector == "content":
    _, want, _ = _pyscenedetect(noisy_video, "content", 0)
    assert r.scores.tolist() == want  # PySceneDetect's content_val, exactly.
    assert cuts.tolist() == [c for c in above if c > 0]
  else:  # A cut also needs a content score >= 15.
    assert len(cuts) >= 3 and set(cuts) <= set(above)


def test_command_json_lines_and_bad_files(trailers, tmp_path, capsys):
  good, bad = tmp_path / "good.mp4", tmp_path / "bad.mp4"
  good.write_bytes(trailers[0]["video"])
  bad.write_bytes(b"not a video")
  assert shots.main(["--json", str(good), str(bad), str(good)]) == 1
  lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
  assert [x["path"] for x in lines] == [str(good), str(bad), str(good)]
  want = shots.analyze(str(good))
  assert lines[0]["shots"] == want.shots.tolist() and lines[2] == lines[0]
  assert lines[0]["num_frames"] == want.num_frames == len(lines[0]["scores"])
  assert lines[0]["scores"] == want.scores.tolist() and lines[0]["fps"] == 24
  assert lines[1] == {"path": str(bad), "error": lines[1]["error"]}
  assert lines[1]["error"].startswith("unreadable container")
  assert shots.main(["--detector", "adaptive", str(good)]) == 0
  out = capsys.readouterr().out
  assert out.startswith(f"{good}: {want.num_frames} frames, 24 fps, ")


def test_command_checks_the_checkpoint_first(tmp_path, capsys):
  video = str(tmp_path / "never_read.mp4")
  with pytest.raises(SystemExit) as e:
    shots.main(["--detector", "transnetv2", video])
  assert e.value.code == 2 and "needs a checkpoint" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    shots.main(["--detector", "transnetv2", "--checkpoint", "/no/ckpt", video])
  assert "/no/ckpt is missing" in capsys.readouterr().err


def test_python_dash_m_entry_point(static_video, tmp_path):
  path = tmp_path / "v.mp4"
  path.write_bytes(static_video)
  cmd = [sys.executable, "-m", "tfds_trailers12k.shots", "--json", str(path)]
  run = subprocess.run(cmd, capture_output=True, text=True, check=True)
  assert json.loads(run.stdout)["shots"] == [
    [0, 12],
    [12, 24],
    [24, 36],
    [36, 48],
  ]
  assert run.stderr == ""  # No runpy warning about the module.
