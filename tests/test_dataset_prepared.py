"""Prepared trailers: saved per trailer, and a killed build resumes."""

import os

import numpy as np
import pytest

import tfds_trailers12k
from tests import kill_build
from tfds_trailers12k import prepared

NUM = 6
KW = dict(num_trailers=NUM, num_workers=1)


def records(builder) -> list[dict]:
  source = tfds_trailers12k.data_source(builder)
  return [source[i] for i in range(len(source))]


def assert_same_dataset(a, b):
  ra, rb = records(a), records(b)
  assert len(ra) == len(rb) == NUM
  for x, y in zip(ra, rb):
    assert x["id"] == y["id"] and x["video"] == y["video"]
    for k in ("shots", "labels", "split_assignment", "true_shots"):
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture(scope="module")
def direct(tmp_path_factory):
  """The dataset built in one go, as the reference."""
  data_dir = str(tmp_path_factory.mktemp("direct"))
  return tfds_trailers12k.build("synthetic", data_dir, **KW)


def test_round_trip_skips_and_unreadable(tmp_path):
  store = prepared.PreparedExamples(tmp_path / "p")
  ex = dict(
    video=b"\x00mp4\xff",
    fps=np.float32(23.976),
    num_frames=np.int32(7),
    shots=np.array([[0, 3], [4, 6]], np.int32),
    title="Ä title",
  )
  store.save("a", ex, "")
  store.save("b", None, "unreadable container")
  mid, got, reason = store.load("a")
  assert (mid, reason) == ("a", "") and set(got) == set(ex)
  assert got["video"] == ex["video"] and got["title"] == ex["title"]
  assert got["fps"] == ex["fps"] and got["fps"].dtype == np.float32
  assert got["num_frames"].dtype == np.int32
  np.testing.assert_array_equal(got["shots"], ex["shots"])
  assert store.load("b") == ("b", None, "unreadable container")
  assert not list((tmp_path / "p").glob(".*tmp*"))  # Renamed into place.
  store.path("a").write_bytes(b"truncated")
  with pytest.raises(ValueError, match=r"a\.npz is unreadable.*delete it"):
    store.load("a")


def test_killed_build_resumes_without_redoing(direct, tmp_path):
  data_dir = str(tmp_path)
  code = (
    "import tfds_trailers12k as t; "
    f"t.build('synthetic', {data_dir!r}, num_trailers={NUM}, num_workers=1)"
  )
  folder = tfds_trailers12k.Trailers12k(
    config=tfds_trailers12k.make_config("synthetic", num_trailers=NUM),
    data_dir=data_dir,
  )._prepared_root
  done = kill_build.kill_after_saved(code, folder)
  assert 2 <= done < NUM, "killed too late to test a resume"
  builder = tfds_trailers12k.build("synthetic", data_dir, **KW)
  assert builder.prepared_counts == dict(reused=done, computed=NUM - done)
  assert not os.path.exists(folder)  # Cleaned up.
  assert_same_dataset(builder, direct)
