"""Raw-clip extraction pipeline: content, errors, workers, per-host shares."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from divita_jax import hosts
from divita_jax.pipelines import extraction
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
    extraction.clip_loader(
      source + [broken], [3, 8, 0], extraction.Decoding(CLIPS)
    )
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


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


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
  threads = extraction.Decoding(CLIPS, threads=1)
  workers = extraction.Decoding(CLIPS, threads=1, processes=2)
  want = list(extraction.clip_loader(source, [5, 2, 7, 0], threads))
  it = iter(extraction.clip_loader(source, [5, 2, 7, 0], workers))
  got = [jax.tree.map(np.copy, x) for x in it]
  it.close()
  assert_same(got, want)


def test_clip_loader_centre_frame_only(source):
  full, centre = (
    next(iter(extraction.clip_loader(source, [4], decoding)))
    for decoding in (
      extraction.Decoding(CLIPS),
      extraction.Decoding(CLIPS, center_frame_only=True),
    )
  )
  assert centre["clips"].shape == full["clips"].shape[:1] + (1, 32, 32, 3)
  np.testing.assert_array_equal(centre["clips"][:, 0], full["clips"][:, 2])
  np.testing.assert_array_equal(
    centre["frame_indices"][:, 0], full["frame_indices"][:, 2]
  )
