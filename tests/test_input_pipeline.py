"""Raw-clip grain pipelines: content, determinism, resume, per-host shares."""

import itertools

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from divita_jax import hosts, input_pipeline
from tests.test_video import decoded_indices, make_video

CLIPS = {"frames_per_clip": 4, "fps": 24.0, "resolution": 32}


def record(i: int, num_shots: int) -> dict:
  """Trailer i: num_shots shots of 8 frames (5 frames for odd i)."""
  length = 8 if i % 2 == 0 else 5
  n = num_shots * length
  v = make_video(n, gop=6)
  shots = np.stack(
    [np.arange(0, n, length), np.arange(length, n + 1, length)], 1
  )
  return {
    "id": f"t{i}".encode(),
    # Odd trailers hold the video as TFDS does: a numpy object scalar.
    "video": np.array(v, object) if i % 2 else v,
    "fps": np.float32(24.0),
    "num_frames": np.int32(n),
    "shots": shots.astype(np.int32),
    "labels": np.eye(10, dtype=np.int32)[i % 10],
  }


@pytest.fixture(scope="module")
def source():
  """A list is a real random-access source: 8 trailers, 1-6 shots each."""
  return [record(i, 1 + i % 6) for i in range(8)]


def test_process_shard_disjoint_and_complete():
  idx = np.arange(11)
  shares = [hosts.process_shard(idx, p, 3) for p in range(3)]
  np.testing.assert_array_equal(np.sort(np.concatenate(shares)), idx)
  assert [len(s) for s in shares] == [4, 4, 3]
  np.testing.assert_array_equal(hosts.process_shard(idx), idx)
  with pytest.raises(ValueError, match="process_index 3"):
    hosts.process_shard(idx, 3, 3)


def test_clip_loader_yields_clips_and_errors(source):
  broken = dict(source[0], id=b"bad", video=b"garbage" * 100)
  items = list(
    input_pipeline.clip_loader(source + [broken], [3, 8, 0], clip_kwargs=CLIPS)
  )
  assert [x["index"] for x in items] == [3, 8, 0]
  t3, bad, t0 = items
  assert t3["id"] == "t3" and t3["clips"].shape == (4, 4, 32, 32, 3)
  # One centred clip per 5-frame shot; each frame shows the planned index.
  np.testing.assert_array_equal(
    decoded_indices(t3["clips"]), t3["frame_indices"]
  )
  np.testing.assert_array_equal(t3["frame_indices"][1], [5, 6, 7, 8])
  np.testing.assert_array_equal(t3["shot_lengths"], [5] * 4)
  assert bad["id"] == "bad" and "'bad'" in bad["error"] and "clips" not in bad
  assert t0["clips"].shape[0] == 1


def train_loader(source, **kw):
  kw = {
    "clip_kwargs": CLIPS,
    "num_clips": 3,
    "global_batch_size": 2,
    "seed": 7,
    "process_index": 0,
    "process_count": 1,
  } | kw
  return input_pipeline.clip_train_loader(source, np.arange(len(source)), **kw)


def take(it, n, close=True):
  """n batches; closes the iterator (stops its prefetch threads) by default."""
  out = [jax.tree.map(np.copy, b) for b in itertools.islice(it, n)]
  if close:
    it.close()
  return out


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_train_windows_masks_and_determinism(source):
  batches = take(iter(train_loader(source)), 8)  # Two epochs.
  assert_same(batches, take(iter(train_loader(source)), 8))
  other = take(iter(train_loader(source, seed=8)), 8)
  assert any(
    not np.array_equal(a["index"], b["index"]) for a, b in zip(batches, other)
  )
  b = batches[0]
  assert (
    b["clips"].shape == (2, 3, 4, 32, 32, 3) and b["clips"].dtype == np.uint8
  )
  for b in batches:
    for i, mask, clips, labels in zip(
      b["index"], b["mask"], b["clips"], b["labels"]
    ):
      num_shots = 1 + i % 6
      assert mask.sum() == min(num_shots, 3)  # Padding is masked...
      assert not clips[~mask].any()  # ...and zero.
      np.testing.assert_array_equal(labels, np.eye(10)[i % 10])
      # A contiguous window of shots: clip c is inside shot start + c.
      length = 8 if i % 2 == 0 else 5
      frames = decoded_indices(clips[mask])  # [valid, T]
      shot = frames // length
      assert (shot == shot[:, :1]).all()
      np.testing.assert_array_equal(np.diff(shot[:, 0]), 1)
  # Each epoch visits every trailer once, in a new order.
  epochs = [
    np.concatenate([b["index"] for b in batches[e * 4 : e * 4 + 4]])
    for e in (0, 1)
  ]
  for e in epochs:
    np.testing.assert_array_equal(np.sort(e), np.arange(8))
  assert not np.array_equal(epochs[0], epochs[1])


def test_restored_iterator_continues_identically(source):
  it = iter(train_loader(source))
  take(it, 3, close=False)
  state = it.get_state()
  expected = take(it, 3)
  restored = iter(train_loader(source))
  restored.set_state(state)
  assert_same(take(restored, 3), expected)


def test_two_processes_see_every_trailer_once_per_epoch(source):
  seen = []
  for p in range(2):
    batches = list(
      train_loader(source, process_index=p, process_count=2, num_epochs=1)
    )
    assert len(batches) == 4  # Batch of 2 global = 1 per process.
    seen.append(np.concatenate([b["index"] for b in batches]))
  assert not set(seen[0]) & set(seen[1])
  np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(8))
  with pytest.raises(ValueError, match="not divisible"):
    train_loader(source, global_batch_size=3, process_count=2)


def test_global_batch_shards_along_data_axis():
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
  local = {"x": np.arange(8 * 3).reshape(8, 3), "mask": np.ones(8, bool)}
  out = hosts.global_batch(local, mesh)
  assert out["x"].shape == (8, 3)
  np.testing.assert_array_equal(np.asarray(out["x"]), local["x"])
  shard = out["x"].addressable_shards[0]
  assert shard.data.shape == (2, 3)  # 8 rows over 4 data shards.
  assert out["x"].sharding.spec == jax.sharding.PartitionSpec("data")


def test_clip_loader_in_worker_processes_equals_threads(source):
  """Decoding in 2 spawned processes: the same trailers, same order."""
  kw = dict(clip_kwargs=CLIPS, num_threads=1)
  want = list(input_pipeline.clip_loader(source, [5, 2, 7, 0], **kw))
  it = iter(
    input_pipeline.clip_loader(source, [5, 2, 7, 0], worker_count=2, **kw)
  )
  got = [jax.tree.map(np.copy, x) for x in it]
  it.close()
  assert_same(got, want)


def test_clip_loader_centre_frame_only(source):
  full, centre = (
    next(iter(input_pipeline.clip_loader(source, [4], **kw)))
    for kw in (
      {"clip_kwargs": CLIPS},
      {"clip_kwargs": CLIPS, "center_frame_only": True},
    )
  )
  assert centre["clips"].shape == full["clips"].shape[:1] + (1, 32, 32, 3)
  np.testing.assert_array_equal(centre["clips"][:, 0], full["clips"][:, 2])
  np.testing.assert_array_equal(
    centre["frame_indices"][:, 0], full["frame_indices"][:, 2]
  )
