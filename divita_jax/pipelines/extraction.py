"""Grain loader of every clip of a trailer, for feature extraction.

The source is random access (`len` and `__getitem__`): the TFDS
`trailers12k` data source (`tfds.data_source(...)`), or a plain list of
records in tests. A record is a dict with at least 'id' (bytes or str),
'video' (encoded mp4 bytes), 'shots' int32 [S, 2] (start, end-exclusive
displayed-frame indices).

Trailers come in the order of the given indices; iterators of the
returned datasets have `get_state()` / `set_state()`.
Fine-tuning batches of decoded clips live in clips.py, batches of clip
representations for the head in reps.py.
"""

import dataclasses
import functools

import grain
import numpy as np

from divita_jax import video
from divita_jax.pipelines import common


class _Subset:
  """Random-access view of `source` at `indices` -> (index, record)."""

  def __init__(self, source, indices: np.ndarray):
    self._source = source
    self._indices = np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, k: int):
    i = int(self._indices[k])
    return i, self._source[i]


@dataclasses.dataclass(frozen=True)
class Decoding:
  """How `clip_loader` decodes a trailer's clips."""

  clip_kwargs: dict  # video.sample_clips keyword arguments.
  center_frame_only: bool = False  # Only frame T // 2 of each clip.
  threads: int = 2  # Decode threads (PyAV releases the GIL) per process.
  processes: int = 0  # Worker processes (spawned); 0: this process only.


def _decode(record, trailer_id: str, decoding: Decoding):
  """A trailer's clips and sampling info; with `center_frame_only` only
  frame T // 2 of each planned clip is decoded ([N, 1, H, W, 3])."""
  shots = np.asarray(record["shots"])
  if not decoding.center_frame_only:
    return video.sample_clips(
      record["video"], shots, trailer_id=trailer_id, **decoding.clip_kwargs
    )
  kwargs = dict(decoding.clip_kwargs)
  resolution = kwargs.pop("resolution", 224)
  with video.Video(record["video"], trailer_id) as v:
    info = video.plan_clips(v.index, shots, trailer_id=trailer_id, **kwargs)
    info["frame_indices"] = video.center_frame(info["frame_indices"])
    return v.read(info["frame_indices"], resolution), info


def _trailer_clips(decoding: Decoding, item) -> dict:
  """(index, record) -> all clips of the trailer, or its error."""
  index, record = item
  trailer_id = common.as_str(record["id"])
  try:
    clips, info = _decode(record, trailer_id, decoding)
  except video.VideoError as e:
    return {"index": index, "id": trailer_id, "error": str(e)}
  return {
    "index": index,
    "id": trailer_id,
    "clips": clips,  # uint8 [N, T, H, W, 3]
    "shot_lengths": info["shot_lengths"],  # [N]
    "frame_indices": info["frame_indices"],  # [N, T]
  }


def clip_loader(source, indices, decoding: Decoding) -> grain.IterDataset:
  """Every clip of each trailer at `indices`, in that order.

  `indices` are used as given: pass `hosts.process_shard(...)` for per-host
  work.
  Yields per trailer {'index': int, 'id': str, 'clips': uint8 [N, T, H, W,
  3], 'shot_lengths': [N], 'frame_indices': [N, T]}, or {'index', 'id',
  'error': str} when its video fails (the caller skips or stops). Decoding
  runs on `decoding.threads` threads and, with `processes` > 0, in that
  many processes (spawned: scripts need the `__main__` guard), each with
  `threads` threads; each buffers about 2 * threads + 1 trailers (~0.35 GB
  each for 100 clips of 24 x 224 x 224), handed over in shared memory.
  `center_frame_only`: clips [N, 1, H, W, 3] and 'frame_indices' [N, 1],
  for centre-frame pooling.
  """
  if decoding.processes > 0:
    source = common.picklable(source)
  ds = grain.MapDataset.source(_Subset(source, indices))
  ds = ds.map(functools.partial(_trailer_clips, decoding))
  threads = decoding.threads
  ds = ds.to_iter_dataset(
    grain.ReadOptions(
      num_threads=threads, prefetch_buffer_size=max(2 * threads, 1)
    )
  )
  if decoding.processes <= 0:
    return ds
  common.allow_grain_workers()
  options = grain.MultiprocessingOptions(num_workers=decoding.processes)
  return ds.mp_prefetch(options)
