"""Representation windows for the DIViTA head (the frozen protocol).

The datasets of common.py (epoch order, windows, padding, processes) over
clip representations read from stores (stores.py). Batches are dicts of
numpy arrays: one entry per branch [b, num_clips, D] float32 (zero-padded),
`mask` bool [b, num_clips], `labels` float32 [b, C], and for eval `trailer`
int32 [b] (subset position, -1 = padding) and `valid` bool [b]. Eval
padding rows hold the subset's first window.

Readers are either preloaded (`preload`: one buffer per branch, a batch is
one gather per branch) or read per batch: official zarr groups in worker
processes (`train_data` chooses, `common.iterate` starts them; decoding in
this process would starve the step), anything else in threads.
"""

import dataclasses
import os

import numpy as np

from divita_jax.pipelines import common, stores


def preload(readers: dict, ids, num_threads: int = 8) -> dict:
  """Loads `ids` of every reader into memory (one buffer per branch);
  readers already in memory are kept as they are."""
  if all(isinstance(r, stores.InMemoryReader) for r in readers.values()):
    return dict(readers)
  return {
    b: stores.InMemoryReader(r, ids, num_threads) for b, r in readers.items()
  }


def default_workers() -> int:
  """Worker processes for streaming from zarr: half the cores, 1 to 8 (the
  other half runs the step and the host side of the input)."""
  return max(1, min(8, (os.cpu_count() or 2) // 2))


def _window(array: np.ndarray, start: int, num_clips: int) -> np.ndarray:
  """[num_clips, D] float32 window from `start`, zero-padded."""
  out = np.zeros((num_clips, array.shape[1]), np.float32)
  part = array[start : start + num_clips]
  out[: len(part)] = part
  return out


@dataclasses.dataclass(frozen=True)
class _Windows:
  """Reads windows of a subset's representations (common.py's reader)."""

  readers: dict  # branch -> reader
  fold: common.FoldData
  indices: np.ndarray  # [n] subset rows into the fold's ids / labels
  num_clips: int

  def train(self, positions, key) -> dict:
    """Windows of subset `positions` [b] from common.random_start."""
    return self.batch(positions, key=key)

  def eval(self, windows) -> dict:
    """Windows [b, 2] (position, start); padding rows read the subset's
    first trailer from clip 0."""
    return self.batch(np.maximum(windows[:, 0], 0), starts=windows[:, 1])

  def batch(self, positions, starts=None, key=None) -> dict:
    """Windows of subset `positions` [b] from `starts` [b], or from starts
    drawn from `key` (seed, epoch)."""
    positions = np.asarray(positions, np.int64)
    rows = self.indices[positions]
    tids = [self.fold.ids[r] for r in rows]
    memory = all(
      isinstance(r, stores.InMemoryReader) for r in self.readers.values()
    )
    if memory:  # Fast path: one gather per branch from the preloaded buffer.
      located = {b: r.locate(tids) for b, r in self.readers.items()}
      lengths = {b: sizes for b, (_, sizes) in located.items()}
    else:
      arrays = {b: _read_once(r, tids) for b, r in self.readers.items()}
      lengths = {b: np.array([len(a) for a in x]) for b, x in arrays.items()}
    length = _same_lengths(lengths, tids)  # [b]
    if starts is None:
      starts = [
        common.random_start(key, p, n, self.num_clips)
        for p, n in zip(positions, length)
      ]
    starts = np.asarray(starts, np.int64)
    clip = starts[:, None] + np.arange(self.num_clips)  # [b, num_clips]
    mask = clip < length[:, None]
    out = {"mask": mask, "labels": self.fold.labels[rows]}
    for b, r in self.readers.items():
      if memory:
        offsets = located[b][0][:, None]
        index = np.minimum(offsets + np.where(mask, clip, 0), len(r.data) - 1)
        x = r.data[index]  # [b, num_clips, D]
        x[~mask] = 0
      else:
        x = np.stack(
          [_window(a, s, self.num_clips) for a, s in zip(arrays[b], starts)]
        )
      out[b] = x
    return out


def _read_once(reader, tids) -> list:
  """Arrays of `tids`, each distinct trailer read once (an eval batch holds
  consecutive windows of the same trailers)."""
  arrays = {}
  for t in tids:
    if t not in arrays:
      arrays[t] = stores.read(reader, t)
  return [arrays[t] for t in tids]


def _same_lengths(lengths: dict, tids) -> np.ndarray:
  first = next(iter(lengths.values()))
  for n in lengths.values():
    bad = np.flatnonzero(n != first)
    if len(bad):
      raise ValueError(
        f"Branches disagree on the number of clips of {tids[bad[0]]}: "
        f"{ {b: int(x[bad[0]]) for b, x in lengths.items()} }."
      )
  return first


def _windows(readers, fold, subset: str, num_clips: int) -> _Windows:
  if not readers:
    raise ValueError("No representation readers given.")
  return _Windows(dict(readers), fold, fold.rows(subset), num_clips)


def train_data(
  readers: dict,
  fold: common.FoldData,
  batching: common.Batching,
  epochs: common.Epochs,
  num_workers: int | None = None,
) -> common.TrainData:
  """Batches of random windows of the fold's 'train' subset for
  `epochs.count` epochs (common.py).

  `num_workers`: processes that `common.iterate` reads the batches in;
  None = `default_workers()` when every reader is a `stores.ZarrStore`
  (streaming from zarr: decoding needs processes to keep up), else 0
  (threads of this process: preloaded or .npy readers are cheap to read).
  """
  src = _windows(readers, fold, "train", batching.num_clips)
  if num_workers is None:  # Processes pay off for zarr decoding only.
    zarr = all(isinstance(r, stores.ZarrStore) for r in readers.values())
    num_workers = default_workers() if zarr else 0
  size = len(src.indices)
  return common.train_data(src.train, size, batching, epochs, num_workers)


def eval_data(
  readers: dict, fold: common.FoldData, subset: str, batching: common.Batching
) -> common.EvalData:
  """Batches of every window of every trailer of `subset` (common.py)."""
  src = _windows(readers, fold, subset, batching.num_clips)
  reader = next(iter(src.readers.values()))
  lengths = [stores.length(reader, fold.ids[i]) for i in src.indices]
  return common.eval_data(src.eval, lengths, batching)
