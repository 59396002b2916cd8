"""Bad input: skipped trailers with reasons, malformed mtgc.csv, NaN reps."""

import io
import multiprocessing
import os
import time

import av
import numpy as np
import pytest

import tfds_trailers12k
from divita_jax import audio
from divita_jax.pipelines import stores
from tests import worker_fns
from tfds_trailers12k import dummy_data, mtgc, shots
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


def test_reps_build_stores_no_features_and_nan_error(tmp_path):
  ok = str(tmp_path / "ok")
  ids = dummy_data.write_reps(ok, clips=(5, 3, 7, 4))
  builder = tfds_trailers12k.build("reps", str(tmp_path / "tfds"), ok)
  index = tfds_trailers12k.load_index(builder)
  assert sorted(index["ids"]) == ids
  np.testing.assert_array_equal(index["num_shots"], -1)  # No shots stored.
  record = tfds_trailers12k.data_source(builder)[0]
  assert "reps" not in record and record["labels"].shape == (10,)
  # The features are read in place, lengths from the zarr metadata.
  image = stores.ZarrStore(os.path.join(ok, dummy_data.REPS_GROUPS[0]))
  assert [image.length(i) for i in ids] == [5, 3, 7, 4]
  assert image.read(ids[0]).shape == (5, 8)
  nan = str(tmp_path / "nan")
  dummy_data.write_reps(nan, nan_id="tt2000002")
  tfds_trailers12k.build("reps", str(tmp_path / "tfds2"), nan)  # Labels ok.
  store = stores.ZarrStore(os.path.join(nan, dummy_data.REPS_GROUPS[0]))
  with pytest.raises(ValueError, match="tt2000002.*NaN"):
    store.read("tt2000002")
  with pytest.raises(ValueError, match="tt2000002.*NaN"):
    stores.InMemoryReader(store, ids)  # What the run's preload does.


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


def _remux_mkv(mp4, mkv, pcm: bool) -> np.ndarray:
  """The mp4's H.264 copied into Matroska with its AAC copied too, or
  (`pcm`) its audio as 16-bit PCM; returns the audio at 16 kHz."""
  sound = audio.load_audio(str(mp4), 0.0, 8.0)
  with av.open(str(mp4)) as src, av.open(str(mkv), "w") as dst:
    video = dst.add_stream_from_template(src.streams.video[0])
    if pcm:
      out = dst.add_stream("pcm_s16le", rate=16000)
      out.layout = "mono"
    else:
      out = dst.add_stream_from_template(src.streams.audio[0])
    streams = src.streams.video[0], src.streams.audio[0]
    for packet in src.demux(streams[0] if pcm else streams):
      if packet.dts is not None:
        packet.stream = video if packet.stream.type == "video" else out
        dst.mux(packet)
    if pcm:
      samples = (sound * 32767).astype(np.int16)[None]
      frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
      frame.sample_rate, frame.pts = 16000, 0
      dst.mux(out.encode(frame))
      dst.mux(out.encode(None))
  return sound


@pytest.mark.parametrize("pcm", [False, True], ids=["aac_copied", "pcm_aac"])
def test_reencoded_trailer_keeps_its_soundtrack(tmp_path, pcm):
  """A raw trailer in Matroska is re-encoded to mp4 with its audio: AAC
  copied packet for packet (the same samples), PCM encoded to AAC."""
  manual = tmp_path / "manual"
  dummy_data.write_raw(str(manual), num_good=1)
  (mp4,) = (manual / "videos").iterdir()
  mkv = mp4.with_suffix(".mkv")
  sound = _remux_mkv(mp4, mkv, pcm)
  mp4.unlink()
  builder = tfds_trailers12k.build(
    "raw", str(tmp_path / "tfds"), str(manual), num_workers=1
  )
  stored = tfds_trailers12k.data_source(builder)[0]["video"]
  with av.open(io.BytesIO(stored)) as c:
    assert c.format.name.startswith("mov") and c.streams.audio
    assert c.streams.audio[0].codec_context.name == "aac"
  kept = audio.load_audio(stored, 0.0, 8.0)
  assert np.abs(sound).max() > 0.05  # The synthetic soundtrack is heard.
  if pcm:  # Lossy: the same sound, within AAC's error at 32 kbit/s.
    assert np.corrcoef(sound, kept)[0, 1] > 0.95
  else:
    np.testing.assert_allclose(kept, sound, atol=1e-6)


def _pool_gone(before: set, timeout: float = 120.0):
  """Waits until the pool's worker processes are gone: the pool is broken."""
  deadline = time.monotonic() + timeout
  while set(multiprocessing.active_children()) - before:
    assert time.monotonic() < deadline, "the crash never broke the pool"
    time.sleep(0.01)


def _consume(items, crash_values, pause_after=None):
  """map_in_pool's output; after result `pause_after` the consumer waits
  until the crash has broken the pool, so the next submit meets a broken
  pool (the window already holds the crash item)."""
  before = set(multiprocessing.active_children())
  out = builder_module.map_in_pool(
    worker_fns.times_ten_or_die,
    [(i, crash_values) for i in items],
    2,
    "test",
    lambda item, detail: ("crash", item[0]),
  )
  got = []
  for k, result in enumerate(out):
    got.append(result)
    if k == pause_after:
      _pool_gone(before)
  return got


def _expected(items, crash_values):
  return [("crash", i) if i in crash_values else i * 10 for i in items]


def test_worker_crash_is_skipped_not_fatal():
  # Item 2 kills its worker while the consumer holds result 0; the next
  # submit (item 4) then meets the broken pool. Item 4 was once lost here.
  assert _consume(range(5), (2,), pause_after=0) == _expected(range(5), (2,))


def test_every_item_comes_back_once_whatever_the_crash_position():
  items = range(6)
  for crash in [(c,) for c in items] + [(1, 4), (0, 5)]:
    # The window holds 4 items: pause while the crash item is in flight.
    pauses = [None] + list(range(max(0, min(crash) - 3), min(crash)))
    for pause_after in pauses:
      got = _consume(items, crash, pause_after)
      assert got == _expected(items, crash), (crash, pause_after)
