"""Bad input: skipped trailers with reasons, malformed mtgc.csv, NaN reps."""

import os

import av
import numpy as np
import pytest

import tfds_trailers12k
from divita_jax import shots
from tfds_trailers12k import dummy_data, mtgc
from tfds_trailers12k import tfds_trailers12k_dataset_builder as builder_module


def test_raw_build_skips_bad_videos_with_reasons(tmp_path):
  manual = str(tmp_path / "manual")
  bad = list(dummy_data.bad_videos())
  truth = dummy_data.write_raw(
    manual, num_good=1, extra_ids=bad + ["bad_missing"]
  )
  dummy_data.write_bad_videos(manual)
  builder = tfds_trailers12k.build(
    "raw", str(tmp_path / "tfds"), manual, num_workers=1
  )
  skipped = {s["id"]: s["reason"] for s in builder.info.metadata["skipped"]}
  expected = {
    "bad_empty": "empty file",
    "bad_garbage": "unreadable container",
    "bad_truncated": "unreadable container",
    "bad_audio_only": "no video stream",
    "bad_no_frames": "no decodable frames",
    "bad_missing": "missing file",
  }
  assert set(skipped) == set(expected)
  for mid, reason in expected.items():
    assert skipped[mid].startswith(reason), (mid, skipped[mid])
  # The good trailer is stored, its metadata too, and the skip list
  # survives a reload from disk.
  source = tfds_trailers12k.data_source(builder)
  assert len(source) == 1
  ex = source[0]
  (mid,) = truth
  assert ex["id"].decode() == mid and ex["title"] == b"First"
  assert ex["year"] == b"1999" and ex["youtube_id"] == b"abc"
  assert ex["imdb_id"] == mid.encode()
  reloaded = tfds_trailers12k.build("raw", str(tmp_path / "tfds"), manual)
  assert len(reloaded.info.metadata["skipped"]) == len(expected)


def test_raw_reencode_to_working_size(tmp_path):
  manual = str(tmp_path / "manual")
  dummy_data.write_raw(manual, num_good=1)
  builder = tfds_trailers12k.build(
    "raw",
    str(tmp_path / "tfds"),
    manual,
    num_workers=1,
    reencode_height=24,
    reencode_fps=12.0,
  )
  ex = tfds_trailers12k.data_source(builder)[0]
  assert (ex["height"], ex["width"], ex["fps"]) == (24, 32, 12.0)
  # Shots index the stored (12 fps) frames and cover them.
  assert ex["shots"][-1, 1] == ex["num_frames"]
  src_frames = dummy_data.TINY.fps * 3  # At least 3 s of source video.
  assert ex["num_frames"] < src_frames


def _write_csv(path, text):
  path.write_text(text)
  return path


HEADER = ",".join(mtgc.COLUMNS)


@pytest.mark.parametrize(
  "row,match",
  [
    (
      "tt1,1,0,0,0,0,0,0,0,0,0,0,1,2\ntt2,2,0,0,0,0,0,0,0,0,0,0,1,2",
      "line 3, column 'action'",
    ),
    ("tt1,1,0,0,0,0,0,0,0,0,0,0,3,2", "line 2, column 'split1'"),
    (
      "tt1,1,0,0,0,0,0,0,0,0,0,0,1,2\ntt1,1,0,0,0,0,0,0,0,0,0,0,1,2",
      "line 3, column 'mid': duplicate id 'tt1'",
    ),
    ("tt1,1,0,0,0,0,0,0,0,0,0,0,1", "line 2, column 'split2'"),
  ],
)
def test_malformed_mtgc_names_row_and_column(tmp_path, row, match):
  path = _write_csv(tmp_path / "mtgc.csv", f"{HEADER}\n{row}\n")
  with pytest.raises(ValueError, match=match):
    mtgc.read_mtgc(path)


def test_missing_column_stops_the_build(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  header = HEADER.replace(",split2", "")
  _write_csv(manual / "mtgc.csv", f"{header}\ntt1,1,0,0,0,0,0,0,0,0,0,0,1\n")
  with pytest.raises(ValueError, match=r"line 1 \(header\).*'split2'"):
    tfds_trailers12k.build("raw", str(tmp_path / "tfds"), str(manual))


def test_reps_build_and_nan_error(tmp_path):
  ids = dummy_data.write_reps(str(tmp_path / "ok"), clips=(5, 3, 7, 4))
  builder = tfds_trailers12k.build(
    "reps", str(tmp_path / "tfds"), str(tmp_path / "ok")
  )
  index = tfds_trailers12k.load_index(builder)
  source = tfds_trailers12k.data_source(builder)
  by_id = dict(zip(index["ids"], index["num_shots"]))
  assert by_id == dict(zip(ids, (5, 3, 7, 4)))
  reps = source[0]["reps"]
  assert set(reps) == {"trailers_i_swin_fpc24", "trailers_ik_swin_fps24_fpc24"}
  assert reps["trailers_i_swin_fpc24"].shape[1] == 8
  assert reps["trailers_i_swin_fpc24"].dtype == np.float32
  dummy_data.write_reps(str(tmp_path / "nan"), nan_id="tt2000002")
  with pytest.raises(ValueError, match="tt2000002.*NaN"):
    tfds_trailers12k.build(
      "reps", str(tmp_path / "tfds2"), str(tmp_path / "nan")
    )


def test_raw_other_container_is_stored_as_mp4(tmp_path):
  manual = tmp_path / "manual"
  dummy_data.write_raw(str(manual), num_good=1)
  (mp4,) = (manual / "videos").iterdir()
  # Remux the same H.264 stream into Matroska.
  mkv = mp4.with_suffix(".mkv")
  with av.open(str(mp4)) as src, av.open(str(mkv), "w") as dst:
    out = dst.add_stream_from_template(src.streams.video[0])
    for packet in src.demux(src.streams.video[0]):
      if packet.dts is not None:
        packet.stream = out
        dst.mux(packet)
  mp4.unlink()
  builder = tfds_trailers12k.build(
    "raw", str(tmp_path / "tfds"), str(manual), num_workers=1
  )
  ex = tfds_trailers12k.data_source(builder)[0]
  assert ex["video"][4:8] == b"ftyp"  # Re-encoded into mp4.
  assert ex["shots"][-1, 1] == ex["num_frames"] > 0
  stored = shots.analyze(ex["video"])
  assert stored.num_frames == ex["num_frames"]


def _die_on_two(item):
  if item == 2:
    os._exit(3)  # Like a decoder segfault: the worker process is gone.
  return item * 10


def test_worker_crash_is_skipped_not_fatal():
  out = builder_module.map_in_pool(
    _die_on_two, [0, 1, 2, 3, 4], 2, "test", lambda item: ("crash", item)
  )
  assert list(out) == [0, 10, ("crash", 2), 30, 40]
