"""Grain pipeline of raw clips for feature extraction.

The source is random access (`len` and `__getitem__`): the TFDS
`trailers12k` data source (`tfds.data_source(...)`), or a plain list of
records in tests. A record is a dict with at least 'id' (bytes or str),
'video' (encoded mp4 bytes), 'shots' int32 [S, 2] (start, end-exclusive
displayed-frame indices) and, for training, 'labels' [10] multi-hot.

Order is deterministic given the seed; iterators of the returned datasets
have `get_state()` / `set_state()`, so their position can be checkpointed.
Fine-tuning batches of decoded clips live in clip_pipeline.py, batches of
clip representations for the head in rep_pipeline.py.
"""

import functools

import grain
import numpy as np
from absl import flags

from divita_jax import video


def _as_str(x) -> str:
  x = x.item() if isinstance(x, np.ndarray) else x
  return x.decode() if isinstance(x, bytes) else str(x)


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


class _Reopened:
  """A TFDS data source that pickles as its folder and split: worker
  processes reopen it read-only (pickling the source itself rebuilds the
  dataset builder, which fails for builders with custom configs)."""

  def __init__(self, source):
    self._data_dir = source.dataset_info.data_dir
    self._split = source.split
    self._source = source

  def __getstate__(self) -> dict:
    return {"_data_dir": self._data_dir, "_split": self._split}

  def __setstate__(self, state: dict) -> None:
    import tensorflow_datasets as tfds  # Only workers of TFDS sources.

    self.__dict__.update(state)
    builder = tfds.builder_from_directory(self._data_dir)
    self._source = builder.as_data_source(split=self._split)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i):
    return self._source[i]


def _picklable(source):
  """`source`, or for a TFDS data source one that worker processes reopen."""
  return _Reopened(source) if hasattr(source, "dataset_info") else source


def _decode(record, trailer_id: str, clip_kwargs: dict, center_only: bool):
  """A trailer's clips and sampling info; with `center_only` only frame
  T // 2 of each planned clip is decoded ([N, 1, H, W, 3])."""
  shots = np.asarray(record["shots"])
  if not center_only:
    return video.sample_clips(
      record["video"], shots, trailer_id=trailer_id, **clip_kwargs
    )
  kwargs = dict(clip_kwargs)
  resolution = kwargs.pop("resolution", 224)
  with video.Video(record["video"], trailer_id) as v:
    info = video.plan_clips(v.index, shots, trailer_id=trailer_id, **kwargs)
    t = info["frame_indices"].shape[1] // 2
    info["frame_indices"] = info["frame_indices"][:, t : t + 1]
    return v.read(info["frame_indices"], resolution), info


def _trailer_clips(item, *, clip_kwargs: dict, center_only: bool) -> dict:
  """(index, record) -> all clips of the trailer, or its error."""
  index, record = item
  trailer_id = _as_str(record["id"])
  try:
    clips, info = _decode(record, trailer_id, clip_kwargs, center_only)
  except video.VideoError as e:
    return {"index": index, "id": trailer_id, "error": str(e)}
  return {
    "index": index,
    "id": trailer_id,
    "clips": clips,  # uint8 [N, T, H, W, 3]
    "shot_lengths": info["shot_lengths"],  # [N]
    "frame_indices": info["frame_indices"],  # [N, T]
  }


def _read_options(num_threads: int) -> grain.ReadOptions:
  return grain.ReadOptions(
    num_threads=num_threads, prefetch_buffer_size=max(2 * num_threads, 1)
  )


def _parallel(ds: grain.IterDataset, worker_count: int) -> grain.IterDataset:
  if worker_count <= 0:
    return ds
  if not flags.FLAGS.is_parsed():
    # Grain's workers read its absl flags; outside absl.app use defaults.
    flags.FLAGS.mark_as_parsed()
  return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))


def clip_loader(
  source,
  indices: np.ndarray,
  *,
  clip_kwargs: dict,
  seed: int = 0,
  shuffle: bool = False,
  num_epochs: int = 1,
  worker_count: int = 0,
  num_threads: int = 2,
  center_frame_only: bool = False,
) -> grain.IterDataset:
  """Every clip of each trailer at `indices` (feature extraction).

  `indices` are used as given: pass `hosts.process_shard(...)` for per-host
  work.
  Yields per trailer {'index': int, 'id': str, 'clips': uint8 [N, T, H, W,
  3], 'shot_lengths': [N], 'frame_indices': [N, T]}, or {'index', 'id',
  'error': str} when its video fails (the caller skips or stops).
  clip_kwargs: keyword arguments of video.sample_clips. Decoding runs on
  `num_threads` threads (PyAV releases the GIL) and, with worker_count > 0,
  in that many processes (spawned: scripts need the `__main__` guard), each
  with `num_threads` threads; each buffers about 2 * num_threads + 1
  trailers (~0.35 GB each for 100 clips of 24 x 224 x 224), handed over in
  shared memory. `center_frame_only`: decode only each clip's frame T // 2
  (clips [N, 1, H, W, 3]; 'frame_indices' [N, 1]) for centre-frame pooling.
  """
  if worker_count > 0:
    source = _picklable(source)
  ds = grain.MapDataset.source(_Subset(source, indices))
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  ds = ds.map(
    functools.partial(
      _trailer_clips, clip_kwargs=clip_kwargs, center_only=center_frame_only
    )
  )
  return _parallel(ds.to_iter_dataset(_read_options(num_threads)), worker_count)
