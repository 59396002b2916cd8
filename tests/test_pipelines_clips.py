"""Decoded-clip pipeline: window content, augmentation, determinism, resume,
processes, failing videos, eval coverage."""

import fractions
import io
import logging

import av
import cv2
import numpy as np
import pytest

from divita_jax import video
from divita_jax.pipelines import clips, common
from tests.test_pipelines_extraction import record

CLIPS = {
  "segmentation": "shots",
  "frames_per_clip": 4,
  "fps": 24.0,
  "placement": "center",
  "max_clips_per_shot": 1,
}
# Two branches share the decode at 32; one is decoded at 16.
BRANCHES = {
  "video": {"resolution": 32, "center_frame": False},
  "image": {"resolution": 32, "center_frame": True},
  "small": {"resolution": 16, "center_frame": False},
}
NO_AUGMENT = {"flip": False, "crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0)}
AUGMENT = {"flip": True, "crop_scale": (0.3, 0.8), "crop_ratio": (0.75, 1.33)}
K = 3  # Clips per training example.


@pytest.fixture(scope="module")
def source():
  """8 trailers; trailer i has 1 + i % 6 clips (one per shot)."""
  return [record(i, 1 + i % 6) for i in range(8)]


def fold_of(source, subset="train"):
  """Every trailer of `source` in `subset`."""
  ids = [r["id"] for r in source]
  labels = np.stack([r["labels"] for r in source])
  return common.FoldData(ids, labels, {subset: np.arange(len(source))})


def train(source, augment=NO_AUGMENT, *, seed=5, count=2, **kw):
  """TrainData of `source`: windows of K clips, 2 a step, 2 epochs; `kw`
  overrides the Batching (num_clips, global_size, process_index,
  process_count), the Decoder (branches, threads) or num_workers."""
  kw = {"branches": BRANCHES, "threads": 2, "num_workers": 0} | kw
  decoder = clips.Decoder(
    source, kw.pop("branches"), CLIPS, kw.pop("threads"), augment
  )
  num_workers = kw.pop("num_workers")
  batching = common.Batching(**({"num_clips": K, "global_size": 2} | kw))
  epochs = common.Epochs(seed, count)
  return clips.train_data(
    decoder, fold_of(source), batching, epochs, num_workers
  )


def evaluation(source, process_index=None, process_count=None):
  """EvalData of every trailer of `source`: windows of 2 clips, 4 a step."""
  decoder = clips.Decoder(source, BRANCHES, CLIPS)
  batching = common.Batching(2, 4, process_index, process_count)
  return clips.eval_data(
    decoder, fold_of(source, "validation"), "validation", batching
  )


_REFERENCE = {}


def reference(source, i: int, resolution: int) -> np.ndarray:
  """All clips of trailer i as extraction decodes them [N, T, R, R, 3]."""
  r = source[i]
  key = (r["id"], resolution)
  if key not in _REFERENCE:
    _REFERENCE[key] = video.sample_clips(
      r["video"], r["shots"], resolution=resolution, **CLIPS
    )[0]
  return _REFERENCE[key]


def batches(data, n=None) -> list:
  """The first n (default all) batches of a TrainData / EvalData."""
  ds = data.dataset
  return [ds[i] for i in range(len(ds) if n is None else n)]


def assert_same(a: list, b: list):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def check_window(source, batch, row, i, start, count):
  """Row `row` of `batch` holds clips [start, start + count) of trailer i,
  unaugmented, then zero padding."""
  mask = batch["mask"][row]
  np.testing.assert_array_equal(mask, np.arange(len(mask)) < count)
  for name, res, sl in (
    ("video", 32, slice(None)),
    ("image", 32, slice(2, 3)),
    ("small", 16, slice(None)),
  ):
    want = reference(source, i, res)[start : start + count, sl]
    np.testing.assert_array_equal(batch[name][row, :count], want, name)
    assert not batch[name][row, count:].any()


def test_train_batches_hold_the_seeded_windows(source):
  data = train(source)
  assert data.steps_per_epoch == 4 and len(data.dataset) == 8
  out = batches(data)
  b = out[0]
  assert b.keys() == {"video", "image", "small", "mask", "labels", "weight"}
  assert b["video"].shape == (2, K, 4, 32, 32, 3)
  assert b["image"].shape == (2, K, 1, 32, 32, 3)
  assert b["small"].shape == (2, K, 4, 16, 16, 3)
  assert b["video"].dtype == np.uint8 and b["mask"].dtype == bool
  assert b["labels"].dtype == b["weight"].dtype == np.float32
  for step, b in enumerate(out):
    epoch = step // 4
    order = common.epoch_order(5, epoch, 8, 8)
    for row, i in enumerate(order[step % 4 * 2 :][:2]):
      n = 1 + i % 6  # Clips of trailer i.
      rng = np.random.default_rng((5, epoch, 1, int(i)))
      start = int(rng.integers(0, max(n - K, 0) + 1))
      check_window(source, b, row, i, start, min(n, K))
      np.testing.assert_array_equal(b["labels"][row], np.eye(10)[i])
      assert b["weight"][row] == 1


def test_same_seed_same_batches_and_resume(source):
  data = train(source, augment=AUGMENT)
  first = batches(data)
  # Another dataset, one decode thread: bitwise the same batches.
  assert_same(batches(train(source, augment=AUGMENT, threads=1)), first)
  other = batches(train(source, augment=AUGMENT, seed=6))
  assert any(
    not np.array_equal(a["video"], b["video"]) for a, b in zip(first, other)
  )
  it = common.iterate(data, state={"next_index": 5})
  assert_same([next(it) for _ in range(3)], first[5:])
  it.close()


def test_two_processes_concatenate_to_one(source):
  whole = batches(train(source, augment=AUGMENT, global_size=4))
  parts = [
    batches(
      train(
        source,
        augment=AUGMENT,
        global_size=4,
        process_index=p,
        process_count=2,
      )
    )
    for p in (0, 1)
  ]
  for b, p0, p1 in zip(whole, *parts):
    for k in b:
      np.testing.assert_array_equal(np.concatenate([p0[k], p1[k]]), b[k])
  with pytest.raises(ValueError, match="not divisible"):
    train(source, global_size=3, process_count=2, process_index=0)


def encode(frames: np.ndarray) -> bytes:
  """Near-lossless H.264 mp4 of uint8 [n, H, W, 3] frames at 24 fps."""
  out = io.BytesIO()
  with av.open(out, "w", format="mp4") as c:
    s = c.add_stream("libx264", rate=24, options={"crf": "0", "g": "6"})
    s.height, s.width = frames.shape[1:3]
    s.pix_fmt = "yuv444p"
    s.codec_context.time_base = fractions.Fraction(1, 24)
    for i, x in enumerate(frames):
      f = av.VideoFrame.from_ndarray(x, format="rgb24")
      f.pts, f.time_base = i, fractions.Fraction(1, 24)
      c.mux(s.encode(f))
    c.mux(s.encode())
  return out.getvalue()


@pytest.fixture(scope="module")
def brightness():
  """One trailer of 4 shots x 8 frames: one asymmetric textured image,
  frame t brightened by 1.5 t."""
  y, x = np.mgrid[0:48, 0:64].astype(np.float32)
  base = 20 + 70 * x / 64 + 40 * y / 48 + 30 * np.sin(x / 5) * np.cos(y / 4)
  base = np.stack([base, base * 0.8 + 20, 160 - base * 0.5], -1)
  frames = np.stack([base + 1.5 * t for t in range(32)])
  shots = np.array([[0, 8], [8, 16], [16, 24], [24, 32]], np.int32)
  rec = {
    "id": b"bright",
    "video": encode(np.clip(frames, 0, 255).astype(np.uint8)),
    "shots": shots,
    "labels": np.eye(10, dtype=np.int32)[0],
  }
  return [rec]


def one_trailer(src, augment, epochs=8, branches=BRANCHES):
  data = train(
    src,
    augment=augment,
    num_clips=4,
    global_size=1,
    count=epochs,
    branches=branches,
  )
  return batches(data)


def test_augmentation_off_is_identity(brightness):
  plain = one_trailer(brightness, None, epochs=1)
  assert_same(one_trailer(brightness, NO_AUGMENT, epochs=1), plain)
  check_window(brightness, plain[0], 0, 0, 0, 4)


def test_flip_is_per_clip(brightness):
  plain = one_trailer(brightness, None, epochs=1)[0]["video"][0]
  flips = []
  for b in one_trailer(brightness, NO_AUGMENT | {"flip": True}):
    for clip, ref in zip(b["video"][0], plain):  # [T, H, W, 3]
      flipped = np.array_equal(clip, ref[:, :, ::-1])
      assert flipped or np.array_equal(clip, ref)
      flips.append(flipped)
  assert 0 < sum(flips) < len(flips)


def test_crop_is_per_clip_and_relative(brightness):
  plain = one_trailer(brightness, None, epochs=1)[0]
  out = one_trailer(brightness, AUGMENT)
  lo, hi = [], []
  for b in out:
    x = b["video"][0].astype(np.float32)  # [clips, T, 32, 32, 3]
    # Same crop of every frame: frames differ by their brightness only.
    step = x[:, 1:] - x[:, :1]  # [clips, T-1, 32, 32, 3]
    lo.append(step.std(axis=(2, 3, 4)).max())
    hi.append(np.abs(x[:, 0] - plain["video"][0, :, 0]).mean())
    # Every branch crops the same relative box: the 16 px branch is the
    # 32 px branch downscaled, the centre-frame branch its frame T // 2.
    np.testing.assert_array_equal(b["image"][0, :, 0], b["video"][0, :, 2])
    small = np.stack(
      [
        cv2.resize(f, (16, 16), interpolation=cv2.INTER_AREA)
        for f in b["video"][0, :, 0]
      ]
    )
    diff = np.abs(small.astype(np.float32) - b["small"][0, :, 0])
    assert diff.mean() < 8, diff.mean()  # Another box: ~17.
  assert max(lo) < 1.5, lo
  assert min(hi) > 5, hi  # Each clip is cropped (or flipped) for real.
  crops = np.stack([b["video"][0, :, 0] for b in out]).astype(np.float32)
  assert np.abs(crops[:, 0] - crops[:, 1]).mean() > 5  # Clips differ.


def broken(source, i=2):
  bad = list(source)
  bad[i] = dict(bad[i], video=b"garbage" * 50)
  return bad


def test_failing_video_weight_zero_in_training(source, caplog):
  with caplog.at_level(logging.WARNING):
    out = batches(train(broken(source), augment=AUGMENT, count=1))
  assert "'t2'" in caplog.text and "cannot open" in caplog.text
  weights = np.concatenate([b["weight"] for b in out])
  assert sorted(weights) == [0] + [1] * 7
  for b in out:
    for row in np.flatnonzero(b["weight"] == 0):
      np.testing.assert_array_equal(b["mask"][row], [True, False, False])
      assert not any(b[k][row].any() for k in BRANCHES)
      np.testing.assert_array_equal(b["labels"][row], np.eye(10)[2])


def test_eval_windows_cover_every_clip_once(source):
  data = evaluation(source)
  counts = clips.clip_counts(clips.Decoder(source, BRANCHES, CLIPS), range(8))
  np.testing.assert_array_equal(counts, [1 + i % 6 for i in range(8)])
  assert data.num_steps == 4 and len(data.windows) == 16  # 14 + 2 pad.
  out = batches(data)
  b = out[0]
  assert b.keys() == BRANCHES.keys() | {"mask", "labels", "trailer", "valid"}
  assert b["video"].shape == (4, 2, 4, 32, 32, 3)
  assert b["trailer"].dtype == np.int32
  seen = {i: [] for i in range(8)}
  rows = np.concatenate([b["trailer"] for b in out])
  np.testing.assert_array_equal(rows, data.windows[:, 0])
  for step, b in enumerate(out):
    for row, (i, start) in enumerate(data.windows[step * 4 : step * 4 + 4]):
      assert b["valid"][row] == (i >= 0)
      if i < 0:  # Padding: one zero clip.
        np.testing.assert_array_equal(b["mask"][row], [True, False])
        assert not b["video"][row].any()
        continue
      count = int(b["mask"][row].sum())
      check_window(source, b, row, i, start, count)
      seen[i] += range(start, start + count)
  for i, got in seen.items():
    assert got == list(range(counts[i]))
  # Two processes' rows concatenate to the one-process batch.
  parts = [
    batches(evaluation(source, process_index=p, process_count=2))
    for p in (0, 1)
  ]
  for b, p0, p1 in zip(out, *parts):
    for k in b:
      np.testing.assert_array_equal(np.concatenate([p0[k], p1[k]]), b[k])


def test_failing_video_raises_in_eval(source):
  with pytest.raises(video.VideoError, match="'t2'"):
    evaluation(broken(source))
  damaged = list(source)
  data = evaluation(damaged)  # Videos validated; then storage breaks.
  damaged[:] = broken(source, 5)
  with pytest.raises(video.VideoError, match="'t5'.*cannot open"):
    batches(data)


def test_worker_processes_equal_threads(source):
  want = batches(train(source, augment=AUGMENT), 4)
  data = train(source, augment=AUGMENT, num_workers=1)
  it = common.iterate(data, state={"next_index": 1})
  assert isinstance(it, common.WorkerIterator)
  got = [next(it) for _ in range(3)]
  it.close()
  assert_same(got, want[1:])
