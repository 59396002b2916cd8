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
"""

import concurrent.futures
import dataclasses
import functools
import inspect

import grain
import numpy as np

from divita_jax import hosts


class InMemoryReader:
  """Reader interface over arrays preloaded into one contiguous buffer."""

  def __init__(self, reader, ids, num_threads: int = 8):
    ids = list(ids)
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
      arrays = list(pool.map(functools.partial(_read, reader), ids))
    sizes = np.array([a.shape[0] for a in arrays], np.int64)
    self._offsets = dict(zip(ids, np.concatenate([[0], np.cumsum(sizes)])))
    self._sizes = dict(zip(ids, sizes))
    self.data = np.concatenate(arrays, 0)  # [total clips, D]
    self.num_features = int(self.data.shape[1])
    self.tag = getattr(reader, "tag", "memory")

  def ids(self) -> list[str]:
    return sorted(self._offsets)

  def has(self, trailer_id: str) -> bool:
    return trailer_id in self._offsets

  def read(self, trailer_id: str, mmap: bool = False) -> np.ndarray:
    del mmap
    if trailer_id not in self._offsets:
      raise KeyError(f"No preloaded representations for {trailer_id}.")
    start = self._offsets[trailer_id]
    return self.data[start : start + self._sizes[trailer_id]]

  def locate(self, trailer_ids) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, sizes) [n] of the trailers' rows in `data`."""
    try:
      return (
        np.array([self._offsets[t] for t in trailer_ids], np.int64),
        np.array([self._sizes[t] for t in trailer_ids], np.int64),
      )
    except KeyError as e:
      raise KeyError(f"No preloaded representations for {e.args[0]}.") from None


def preload(readers: dict, ids, num_threads: int = 8) -> dict:
  """Loads `ids` of every reader into memory (one buffer per branch);
  readers already in memory are kept as they are."""
  if all(isinstance(r, InMemoryReader) for r in readers.values()):
    return dict(readers)
  return {b: InMemoryReader(r, ids, num_threads) for b, r in readers.items()}


def _read(reader, trailer_id: str) -> np.ndarray:
  """[clips, D]; memory-mapped where the reader supports it."""
  if "mmap" in inspect.signature(reader.read).parameters:
    array = reader.read(trailer_id, mmap=True)
  else:
    array = reader.read(trailer_id)
  if array.ndim != 2:
    raise ValueError(
      f"Representations of {trailer_id} must be [clips, features], got "
      f"shape {array.shape}."
    )
  return array


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
    memory = all(isinstance(r, InMemoryReader) for r in self.readers.values())
    if memory:  # Fast path: one gather per branch from the preloaded buffer.
      located = {b: r.locate(tids) for b, r in self.readers.items()}
      lengths = {b: sizes for b, (_, sizes) in located.items()}
    else:
      arrays = {b: [_read(r, t) for t in tids] for b, r in self.readers.items()}
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
) -> TrainData:
  """Batches of random windows for `num_epochs` epochs (see module doc)."""
  indices = _check(readers, ids, labels, indices)
  share = hosts.process_rows(global_batch_size, process_index, process_count)
  src = _Source(
    dict(readers), tuple(ids), np.asarray(labels), indices, num_clips
  )
  n = len(indices)
  steps = -(-n // global_batch_size)

  @functools.lru_cache(maxsize=2)
  def order(epoch):  # [steps * global batch] subset positions
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return np.resize(perm, steps * global_batch_size)  # Wraps around.

  def make_batch(i):
    epoch, step = divmod(int(i), steps)
    rows = order(epoch)[step * global_batch_size :][:global_batch_size]
    # Window starts depend on (seed, epoch, position) only: independent of
    # the process layout, the batch a trailer falls in, and thread timing.
    return src.batch(
      rows[share], seeds=[(seed, epoch, 1, int(p)) for p in rows[share]]
    )

  ds = grain.MapDataset.range(num_epochs * steps).map(make_batch)
  return TrainData(ds, steps)


def eval_windows(readers: dict, ids, indices, num_clips: int) -> np.ndarray:
  """[W, 2] (subset position, start clip) of every window of every trailer."""
  reader = next(iter(readers.values()))
  rows = []
  for pos, i in enumerate(np.asarray(indices)):
    length = _read(reader, ids[i]).shape[0]
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
):
  """Prefetching iterator over `dataset`, optionally restored to `state`."""
  it = iter(
    dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    )
  )
  if state is not None:
    it.set_state(state)
  return it
