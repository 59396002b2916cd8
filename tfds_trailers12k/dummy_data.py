"""Tiny manual_dir fixtures for tests: raw videos, mtgc.csv, zarr v2 reps.

`write_raw(dir)` and `write_reps(dir)` build what the `raw` and `reps`
configs read, in seconds, from the synthetic generator at a small size.
Bad inputs for the skip logic are added with `write_bad_videos`.
"""

import csv
import io
import json
import os

import av
import numpy as np

from tfds_trailers12k import mtgc, synthetic

TINY = synthetic.SyntheticConfig(
  num_trailers=3, height=48, width=64, min_seconds=3.0, max_seconds=4.0
)


def write_mtgc(path: str, ids: list[str], labels, splits) -> None:
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(mtgc.COLUMNS)
    for mid, lab, spl in zip(ids, labels, splits):
      w.writerow([mid, *map(int, lab), *map(int, spl)])


def _labels_splits(n: int, seed: int = 0):
  labels = synthetic.sample_labels(
    synthetic.SyntheticConfig(num_trailers=n, seed=seed)
  )
  splits = np.stack(
    [np.arange(n) % 3, (np.arange(n) + 1) % 3, (np.arange(n) + 2) % 3], 1
  )
  return labels, splits


def write_raw(root: str, num_good: int = 3, extra_ids=()) -> dict:
  """Writes videos/<id>.mp4 for `num_good` trailers, mtgc.csv, metadata.json.

  `extra_ids` are listed in mtgc.csv without a video (for bad-input
  fixtures written afterwards). Returns {id: true_shots}.
  """
  os.makedirs(os.path.join(root, "videos"), exist_ok=True)
  ids = [f"tt{1000000 + i}" for i in range(num_good)] + list(extra_ids)
  labels, splits = _labels_splits(len(ids))
  truth = {}
  for i in range(num_good):
    t = synthetic.make_trailer(i, TINY, labels[i])
    with open(os.path.join(root, "videos", f"{ids[i]}.mp4"), "wb") as f:
      f.write(t["video"])
    truth[ids[i]] = t["true_shots"]
  write_mtgc(os.path.join(root, "mtgc.csv"), ids, labels, splits)
  meta = {ids[0]: {"title": "First", "year": 1999, "youtube_id": "abc"}}
  with open(os.path.join(root, "metadata.json"), "w") as f:
    json.dump(meta, f)
  return truth


def _audio_only_mp4() -> bytes:
  buf = io.BytesIO()
  with av.open(buf, mode="w", format="mp4") as out:
    stream = out.add_stream("aac", rate=16000)
    samples = np.zeros((1, 1024), np.float32)
    for i in range(8):
      frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
      frame.sample_rate, frame.pts = 16000, i * 1024
      out.mux(stream.encode(frame))
    out.mux(stream.encode(None))
  return buf.getvalue()


def _no_frames_mp4(good: bytes) -> bytes:
  """A readable mp4 whose video packets are all zeros: nothing decodes."""
  i = good.find(b"mdat")
  size = int.from_bytes(good[i - 4 : i], "big")
  return good[: i + 4] + bytes(size - 8) + good[i - 4 + size :]


def bad_videos() -> dict[str, bytes]:
  """id -> file bytes of each bad case (ids name the case)."""
  good = synthetic.make_trailer(0, TINY, np.eye(10, dtype=np.int32)[4])
  return {
    "bad_empty": b"",
    "bad_garbage": np.random.default_rng(0).bytes(5000),
    "bad_truncated": good["video"][: len(good["video"]) // 2],
    "bad_audio_only": _audio_only_mp4(),
    "bad_no_frames": _no_frames_mp4(good["video"]),
  }


def write_bad_videos(root: str) -> list[str]:
  """Writes the bad cases into videos/; returns their ids."""
  for mid, data in bad_videos().items():
    with open(os.path.join(root, "videos", f"{mid}.mp4"), "wb") as f:
      f.write(data)
  return list(bad_videos())


# The official Swin groups (paper's best), as the `reps` config variant
# names them.
REPS_GROUPS = (
  "trailers_i_swin_fpc24.zarr",
  "trailers_ik_swin_fps24_fpc24.zarr",
)


def write_reps(
  root: str,
  num: int = 4,
  clips=(5, 3, 7, 4),
  features=(8, 6),
  nan_id: str | None = None,
) -> list[str]:
  """mtgc.csv + the two REPS_GROUPS zarr v2 groups with [clips, feats]
  arrays (one chunk each, as the official groups); returns the ids."""
  import zarr

  os.makedirs(root, exist_ok=True)
  ids = [f"tt{2000000 + i}" for i in range(num)]
  labels, splits = _labels_splits(num, seed=1)
  write_mtgc(os.path.join(root, "mtgc.csv"), ids, labels, splits)
  rng = np.random.default_rng(0)
  for group, dim in zip(REPS_GROUPS, features):
    g = zarr.open_group(os.path.join(root, group), mode="w", zarr_format=2)
    g.attrs["num_features"] = dim
    for mid, n in zip(ids, clips):
      array = rng.normal(size=(n, dim)).astype(np.float32)
      if mid == nan_id:
        array[0, 0] = np.nan
      g.create_array(mid, data=array, chunks=array.shape)
  return ids
