"""grain input pipeline over clip representations (the DIViTA head's input).

Train: every epoch a permutation of the subset (from seed and epoch) is cut
into global batches of `global_batch_size` trailers; the last batch is filled
with the first trailers of the same permutation, so each trailer is seen at
least once per epoch. Each example is a random contiguous window of
`num_clips` clips (start drawn from seed, epoch and position), zero-padded
with `mask` False when the trailer is shorter. Process p of P reads rows
[p*b, (p+1)*b) of every global batch (b = global / P), so the global batch
and hence training are identical for any number of processes.

Eval: all consecutive windows of `num_clips` clips of every trailer (the last
one padded); the list is padded to whole global batches with copies of the
first window marked `valid` False and `trailer` -1, so every process runs
the same number of steps.

Batches are dicts of numpy arrays: one entry per branch [b, num_clips, D]
float32, `mask` bool [b, num_clips], `labels` float32 [b, 10], and for eval
`trailer` int32 [b] (index into the subset, -1 = padding) and `valid` bool
[b]. Datasets are grain `MapDataset`s of whole batches (random access), so
an iterator's state is one integer and restores exactly.

Readers (stores.py) are either preloaded (`preload`: one buffer per branch,
a batch is one gather per branch) or read per batch: official zarr groups
in worker processes (`train_data` chooses, `iterate` starts them; decoding
in this process would starve the step), anything else in threads.
"""

import dataclasses
import functools
import os
import weakref

import grain
import numpy as np
from absl import flags

from divita_jax import hosts
from divita_jax.pipelines import stores

# Train datasets -> worker processes `iterate` reads them in (see train_data).
_WORKERS = weakref.WeakKeyDictionary()


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
class _Source:
  readers: dict  # branch -> reader
  ids: tuple  # all trailer ids
  labels: np.ndarray  # [N, 10]
  indices: np.ndarray  # [n] subset rows into ids / labels
  num_clips: int

  def batch(self, positions, starts=None, seeds=None) -> dict:
    """Windows of subset `positions` [b] from `starts` [b], or from random
    starts drawn with one `np.random.default_rng(seed)` per example."""
    rows = self.indices[np.asarray(positions, np.int64)]
    tids = [self.ids[r] for r in rows]
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
        np.random.default_rng(seed).integers(0, max(n - self.num_clips, 0) + 1)
        for seed, n in zip(seeds, length)
      ]
    starts = np.asarray(starts, np.int64)
    clip = starts[:, None] + np.arange(self.num_clips)  # [b, num_clips]
    mask = clip < length[:, None]
    out = {"mask": mask, "labels": self.labels[rows].astype(np.float32)}
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


def _check(readers, ids, labels, indices):
  if not readers:
    raise ValueError("No representation readers given.")
  indices = np.asarray(indices, np.int64)
  if len(indices) == 0:
    raise ValueError("The subset to load is empty.")
  if labels.shape[0] != len(ids):
    raise ValueError(f"labels has {labels.shape[0]} rows for {len(ids)} ids.")
  if indices.min() < 0 or indices.max() >= len(ids):
    raise ValueError(f"Subset indices out of range [0, {len(ids)}).")
  return indices


@dataclasses.dataclass(frozen=True)
class TrainData:
  dataset: grain.MapDataset  # one element = one process-local batch
  steps_per_epoch: int


def train_data(
  readers: dict,
  ids,
  labels,
  indices,
  *,
  num_clips: int,
  global_batch_size: int,
  seed: int,
  num_epochs: int,
  process_index: int | None = None,
  process_count: int | None = None,
  num_workers: int | None = None,
) -> TrainData:
  """Batches of random windows for `num_epochs` epochs (see module doc).

  `num_workers`: processes that `iterate` reads the batches in; None =
  `default_workers()` when every reader is a `stores.ZarrStore` (streaming
  from zarr: decoding needs processes to keep up), else 0 (threads of this
  process: preloaded or .npy readers are cheap to read).
  """
  indices = _check(readers, ids, labels, indices)
  share = hosts.process_rows(global_batch_size, process_index, process_count)
  src = _Source(
    dict(readers), tuple(ids), np.asarray(labels), indices, num_clips
  )
  steps = -(-len(indices) // global_batch_size)
  make_batch = functools.partial(
    _train_batch, src, share, seed, steps, global_batch_size
  )
  ds = grain.MapDataset.range(num_epochs * steps).map(make_batch)
  if num_workers is None:  # Processes pay off for zarr decoding only.
    zarr = all(isinstance(r, stores.ZarrStore) for r in readers.values())
    num_workers = default_workers() if zarr else 0
  if num_workers:
    _WORKERS[ds] = num_workers
  return TrainData(ds, steps)


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, n: int, size: int) -> np.ndarray:
  """[size] subset positions of an epoch: a permutation, wrapped around."""
  return np.resize(np.random.default_rng([seed, epoch]).permutation(n), size)


def _train_batch(src, share, seed, steps, global_batch_size, i) -> dict:
  # Module-level (not a closure): worker processes receive it pickled.
  epoch, step = divmod(int(i), steps)
  order = _epoch_order(seed, epoch, len(src.indices), steps * global_batch_size)
  rows = order[step * global_batch_size :][:global_batch_size]
  # Window starts depend on (seed, epoch, position) only: independent of
  # the process layout, the batch a trailer falls in, and thread timing.
  return src.batch(
    rows[share], seeds=[(seed, epoch, 1, int(p)) for p in rows[share]]
  )


def eval_windows(readers: dict, ids, indices, num_clips: int) -> np.ndarray:
  """[W, 2] (subset position, start clip) of every window of every trailer."""
  reader = next(iter(readers.values()))
  rows = []
  for pos, i in enumerate(np.asarray(indices)):
    length = stores.length(reader, ids[i])
    for start in range(0, max(length, 1), num_clips):
      rows.append((pos, start))
  return np.asarray(rows, np.int64).reshape(-1, 2)


@dataclasses.dataclass(frozen=True)
class EvalData:
  dataset: grain.MapDataset  # one element = one process-local batch
  windows: np.ndarray  # [steps * global batch, 2]; position -1 = padding
  num_steps: int


def eval_data(
  readers: dict,
  ids,
  labels,
  indices,
  *,
  num_clips: int,
  global_batch_size: int,
  process_index: int | None = None,
  process_count: int | None = None,
) -> EvalData:
  """Batches of every window of every trailer (see module doc)."""
  indices = _check(readers, ids, labels, indices)
  share = hosts.process_rows(global_batch_size, process_index, process_count)
  src = _Source(
    dict(readers), tuple(ids), np.asarray(labels), indices, num_clips
  )
  windows = eval_windows(readers, ids, indices, num_clips)
  steps = -(-len(windows) // global_batch_size)
  pad = steps * global_batch_size - len(windows)
  windows = np.concatenate([windows, np.tile([[-1, 0]], (pad, 1))], 0)

  def make_batch(i):
    rows = windows[int(i) * global_batch_size :][:global_batch_size][share]
    out = src.batch(np.maximum(rows[:, 0], 0), starts=rows[:, 1])
    out["trailer"] = rows[:, 0].astype(np.int32)
    out["valid"] = rows[:, 0] >= 0
    return out

  ds = grain.MapDataset.range(steps).map(make_batch)
  return EvalData(ds, windows, steps)


def iterate(
  dataset: grain.MapDataset,
  num_threads: int = 2,
  prefetch: int = 4,
  state: dict | None = None,
  num_workers: int | None = None,
):
  """Prefetching iterator over `dataset`, optionally restored to `state`.

  `num_workers` > 0 reads batches in that many worker processes (grain
  `mp_prefetch`, `prefetch` batches buffered per worker); None = what
  `train_data` chose for the dataset (0 for any other dataset: evaluation
  iterators are short-lived, worker start-up would dominate). The state is
  {'next_index': batches consumed} in both modes, so a run checkpointed
  while streaming resumes preloaded and vice versa.
  """
  if num_workers is None:
    num_workers = _WORKERS.get(dataset, 0)
  if num_workers:
    return _WorkerIterator(dataset, num_workers, prefetch, state)
  it = iter(
    dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    )
  )
  if state is not None:
    it.set_state(state)
  return it


class _WorkerIterator:
  """Batches of a MapDataset read by worker processes, in order.

  grain starts the workers with `spawn` (fresh interpreters: safe beside
  JAX's threads; the dataset and its readers travel cloudpickled, and the
  main module is imported as `__mp_main__`, so scripts need the usual
  `if __name__ == "__main__"` guard). A restore restarts the workers at the
  restored position.
  """

  def __init__(self, dataset, num_workers: int, buffer: int, state=None):
    self._dataset, self._workers, self._buffer = dataset, num_workers, buffer
    self._it = None
    self.set_state(state or {"next_index": 0})

  def set_state(self, state: dict) -> None:
    self.close()
    _default_unparsed_grain_flag()
    self._next = int(state["next_index"])
    rest = self._dataset.slice(slice(self._next, None))
    # One batch at a time inside a worker: the workers are the parallelism.
    ds = rest.to_iter_dataset(grain.ReadOptions(num_threads=0))
    options = grain.MultiprocessingOptions(
      num_workers=self._workers, per_worker_buffer_size=self._buffer
    )
    self._it = iter(ds.mp_prefetch(options))

  def get_state(self) -> dict:
    return {"next_index": self._next}

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._it)
    self._next += 1
    return batch

  def close(self) -> None:
    if self._it is not None:
      self._it.close()
      self._it = None

  def __del__(self):
    self.close()


def _default_unparsed_grain_flag() -> None:
  """grain 0.2.18 reads this flag in mp_prefetch without checking that
  flags were parsed (google/grain#1355, fixed after 0.2.18): outside
  absl.app (tests, notebooks, scripts) it then raises. Only this one flag
  is marked given, with its default value."""
  flag = flags.FLAGS["grain_enable_multiprocess_worker_profiling"]
  if not flags.FLAGS.is_parsed() and not flag.present:
    flag.present = 1
