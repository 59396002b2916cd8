"""Representation windows for the DIViTA head (the frozen protocol).

The datasets of common.py (epoch order, windows, padding, processes) over
clip representations read from stores (stores.py). Batches are dicts of
numpy arrays: one entry per branch [b, num_clips, D] float32 (zero-padded),
`mask` bool [b, num_clips], `labels` float32 [b, C], and for eval `trailer`
int32 [b] (subset position, -1 = padding) and `valid` bool [b]. Eval
padding rows hold the subset's first window.

Readers are either preloaded (`preload`: one buffer per branch, a batch is
one gather per branch; `train_stacks` gathers several training steps'
batches at once) or read per batch: official zarr groups in worker
processes (`train_data` chooses, `common.iterate` starts them; decoding in
this process would starve the step), anything else in threads.
"""

import dataclasses
import os

import numpy as np

from divita_jax import hosts
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
  # Preloaded readers only (else None), located once: branch -> int64 [n]
  # first row of each subset trailer in the reader's buffer, and [n] clips.
  offsets: dict | None = None
  lengths: np.ndarray | None = None

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
    if self.offsets is not None:  # Preloaded: one take per branch.
      if starts is None:
        starts = self._starts(key, positions)
      return self.gather(positions, np.asarray(starts, np.int64))
    rows = self.indices[positions]
    tids = [self.fold.ids[r] for r in rows]
    arrays = {b: _read_once(r, tids) for b, r in self.readers.items()}
    lengths = {b: np.array([len(a) for a in x]) for b, x in arrays.items()}
    length = _same_lengths(lengths, tids)  # [b]
    if starts is None:
      starts = [
        common.random_start(key, p, n, self.num_clips)
        for p, n in zip(positions, length)
      ]
    clip = np.asarray(starts, np.int64)[:, None] + np.arange(self.num_clips)
    out = {"mask": clip < length[:, None], "labels": self.fold.labels[rows]}
    for b in self.readers:
      out[b] = np.stack(
        [_window(a, s, self.num_clips) for a, s in zip(arrays[b], starts)]
      )  # [b, num_clips, D]
    return out

  def stack(self, positions: np.ndarray, keys) -> dict:
    """Training windows of several steps at once (preloaded readers):
    subset `positions` [n, b], starts drawn from `keys` [n] (seed, epoch);
    every entry [n, b, ...], equal to np.stack of n `train` batches."""
    starts = [self._starts(k, p) for k, p in zip(keys, positions)]
    return self.gather(positions, np.asarray(starts, np.int64))

  def _starts(self, key, positions) -> list:
    lengths = self.lengths[positions]
    return [
      common.random_start(key, p, n, self.num_clips)
      for p, n in zip(positions, lengths)
    ]

  def gather(self, positions: np.ndarray, starts: np.ndarray) -> dict:
    """Windows of subset `positions` from `starts` (both [..., b]) out of
    the preloaded buffers, zero-padded: one np.take per branch."""
    clip = starts[..., None] + np.arange(self.num_clips)  # [..., b, clips]
    mask = clip < self.lengths[positions][..., None]
    out = {"mask": mask, "labels": self.fold.labels[self.indices[positions]]}
    for b, r in self.readers.items():
      rows = self.offsets[b][positions][..., None] + np.where(mask, clip, 0)
      # Aligned: the CPU backend takes the windows without a copy.
      x = hosts.aligned_empty(rows.shape + r.data.shape[1:], r.data.dtype)
      np.take(r.data, rows, axis=0, out=x, mode="clip")
      x[~mask] = 0
      out[b] = x  # [..., b, num_clips, D]
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
  indices = fold.rows(subset)
  if not all(isinstance(r, stores.InMemoryReader) for r in readers.values()):
    return _Windows(dict(readers), fold, indices, num_clips)
  tids = [fold.ids[i] for i in indices]
  located = {b: r.locate(tids) for b, r in readers.items()}
  lengths = _same_lengths({b: n for b, (_, n) in located.items()}, tids)
  offsets = {b: o for b, (o, _) in located.items()}
  return _Windows(dict(readers), fold, indices, num_clips, offsets, lengths)


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


@dataclasses.dataclass(frozen=True)
class _TrainStacks:
  """(first step, n) -> the local batches of training steps first ..
  first + n - 1 stacked [n, b, ...]: common.train_data's order, shares and
  windows, gathered in one np.take per branch (no per-step batches to
  stack)."""

  windows: _Windows
  steps: int  # Per epoch.
  global_size: int
  share: slice
  epochs: common.Epochs

  def __call__(self, first: int, n: int) -> dict:
    if first < 0 or n < 1 or first + n > self.steps * self.epochs.count:
      raise IndexError(
        f"Training steps [{first}, {first + n}) are outside the "
        f"{self.steps * self.epochs.count} steps of the data."
      )
    g, seed = self.global_size, self.epochs.seed
    size = len(self.windows.indices)
    positions, keys = [], []
    for i in range(first, first + n):
      epoch, step = divmod(i, self.steps)
      order = common.epoch_order(seed, epoch, size, self.steps * g)
      positions.append(order[step * g :][:g][self.share])
      keys.append((seed, epoch))
    return self.windows.stack(np.stack(positions), keys)  # [n, b, ...]


def train_stacks(
  readers: dict,
  fold: common.FoldData,
  batching: common.Batching,
  epochs: common.Epochs,
):
  """What `train_data` gives, read several steps at a time: a function
  (first step, n) -> stacked batches [n, b, ...], equal to np.stack of
  its batches first .. first + n - 1; None unless every reader is
  preloaded (`preload`)."""
  src = _windows(readers, fold, "train", batching.num_clips)
  if src.offsets is None:
    return None
  steps = batching.steps(len(src.indices))
  return _TrainStacks(
    src, steps, batching.global_size, batching.share(), epochs
  )


def eval_data(
  readers: dict, fold: common.FoldData, subset: str, batching: common.Batching
) -> common.EvalData:
  """Batches of every window of every trailer of `subset` (common.py)."""
  src = _windows(readers, fold, subset, batching.num_clips)
  reader = next(iter(src.readers.values()))
  lengths = [stores.length(reader, fold.ids[i]) for i in src.indices]
  return common.eval_data(src.eval, lengths, batching)
