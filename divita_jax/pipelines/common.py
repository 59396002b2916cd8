"""What the clip and representation pipelines share.

A fold's trailers (`FoldData`), how they become steps (`Batching`,
`Epochs`), and the datasets built from a pipeline's window reader:

Train: every epoch a permutation of the subset (from seed and epoch) is cut
into global batches of `Batching.global_size` trailers; the last batch is
filled with the first trailers of the same permutation, so each trailer is
seen at least once per epoch. Each example is a window of
`Batching.num_clips` consecutive clips from a random start
(`random_start`: seed, epoch and subset position only). Process p of P
reads rows [p*b, (p+1)*b) of every global batch (b = global / P), so the
global batch is the same for any number of processes.

Eval: every consecutive window of `num_clips` clips of every trailer, at
least one per trailer (`eval_windows`), padded to whole global batches with
(position -1, start 0) rows marked `valid` False and `trailer` -1, so every
process runs the same number of steps.

Datasets are grain `MapDataset`s whose element i is the process-local
batch of step i (random access): an iterator's state is
{'next_index': batches consumed} and restores exactly, in threads or in
worker processes (`iterate`).
"""

import dataclasses
import functools
from collections.abc import Callable

import grain
import numpy as np
from absl import flags

import tfds_trailers12k
from divita_jax import hosts
from tfds_trailers12k import genres


def as_str(x) -> str:
  """A trailer id as str (TFDS gives bytes, or numpy scalars of them)."""
  x = x.item() if isinstance(x, np.ndarray) else x
  return x.decode() if isinstance(x, bytes) else str(x)


# ---------------------------------------------------------------- fold data


@dataclasses.dataclass(frozen=True, eq=False)
class FoldData:
  """One fold's trailers: every source row's id and labels, and the rows
  of each subset."""

  ids: tuple  # [N] str, rows of the source / readers.
  labels: np.ndarray  # [N, C] float32
  subsets: dict  # name -> int64 [n] rows into ids.
  fold: int | None = None  # None: not a fold of the split (prediction).

  def __post_init__(self):
    # Normalised once (frozen: object.__setattr__), so that every pipeline
    # reads the same types.
    subsets = {k: np.asarray(v, np.int64) for k, v in self.subsets.items()}
    object.__setattr__(self, "ids", tuple(as_str(x) for x in self.ids))
    object.__setattr__(self, "labels", np.asarray(self.labels, np.float32))
    object.__setattr__(self, "subsets", subsets)
    if self.labels.shape[0] != len(self.ids):
      raise ValueError(
        f"labels has {self.labels.shape[0]} rows for {len(self.ids)} ids."
      )
    for name, rows in subsets.items():
      if len(rows) and (rows.min() < 0 or rows.max() >= len(self.ids)):
        raise ValueError(
          f"Subset {name!r} indices out of range [0, {len(self.ids)})."
        )

  @classmethod
  def from_split(cls, ids, labels, split_assignment, fold: int):
    """Subsets 'train', 'validation', 'test' of `fold` of the split
    assignment [N, 3] (tfds_trailers12k.subset_indices)."""
    subsets = {
      n: tfds_trailers12k.subset_indices(split_assignment, fold, n)
      for n in genres.SUBSETS
    }
    return cls(ids, labels, subsets, fold)

  def rows(self, subset: str) -> np.ndarray:
    """int64 [n] rows of a subset to load; raises when it is empty."""
    if subset not in self.subsets:
      raise ValueError(f"No subset {subset!r}; have {sorted(self.subsets)}.")
    if not len(self.subsets[subset]):
      raise ValueError(f"The subset to load ({subset!r}) is empty.")
    return self.subsets[subset]


# ---------------------------------------------------------------- batching


@dataclasses.dataclass(frozen=True)
class Batching:
  """Examples of `num_clips` clips, `global_size` per step over all
  processes; this process loads its `share()` of each global batch."""

  num_clips: int
  global_size: int
  process_index: int | None = None  # None: jax.process_index().
  process_count: int | None = None  # None: jax.process_count().

  def share(self) -> slice:
    """This process's rows of a global batch."""
    return hosts.process_rows(
      self.global_size, self.process_index, self.process_count
    )

  def steps(self, num_examples: int) -> int:
    return -(-num_examples // self.global_size)


@dataclasses.dataclass(frozen=True)
class Epochs:
  seed: int  # Epoch order, window starts and augmentation.
  count: int


@functools.lru_cache(maxsize=2)
def epoch_order(seed: int, epoch: int, n: int, size: int) -> np.ndarray:
  """[size] subset positions of an epoch: a permutation, wrapped around."""
  return np.resize(np.random.default_rng([seed, epoch]).permutation(n), size)


def random_start(key: tuple, position: int, length: int, num_clips: int) -> int:
  """First clip of a training window of `num_clips` of a trailer of
  `length` clips, drawn from `key` (seed, epoch) and the subset position
  alone: independent of the process layout, the batch a trailer falls in
  and thread timing."""
  rng = np.random.default_rng((*key, 1, int(position)))
  return int(rng.integers(0, max(int(length) - num_clips, 0) + 1))


def eval_windows(lengths, batching: Batching) -> np.ndarray:
  """[steps * global size, 2] (subset position, start clip) of every
  window of `num_clips` clips of trailers of `lengths` clips, then padding
  rows (-1, 0). A trailer without clips gets one (empty) window: every
  trailer has probabilities."""
  k = batching.num_clips
  rows = [
    (pos, start)
    for pos, n in enumerate(lengths)
    for start in range(0, max(int(n), 1), k)
  ]
  windows = np.asarray(rows, np.int64).reshape(-1, 2)  # [W, 2]
  pad = batching.steps(len(windows)) * batching.global_size - len(windows)
  return np.concatenate([windows, np.tile([[-1, 0]], (pad, 1))], 0)


# ---------------------------------------------------------------- datasets


@dataclasses.dataclass(frozen=True)
class TrainData:
  dataset: grain.MapDataset  # One element = one process-local batch.
  steps_per_epoch: int
  num_workers: int = 0  # Processes `iterate` reads in; 0: threads here.


@dataclasses.dataclass(frozen=True)
class EvalData:
  dataset: grain.MapDataset  # One element = one process-local batch.
  windows: np.ndarray  # [num_steps * global size, 2]; position -1 = pad.
  num_steps: int
  # Evaluation iterators are short-lived: worker start-up would dominate.
  num_workers: int = 0


@dataclasses.dataclass(frozen=True)
class _TrainBatches:
  """Step i -> the process-local batch (a value, not a closure: worker
  processes receive it pickled)."""

  read: Callable  # (subset positions [b], (seed, epoch)) -> batch.
  size: int  # Trailers in the subset.
  steps: int  # Per epoch.
  global_size: int
  share: slice  # Batching.share(), taken here: workers never ask JAX.
  seed: int

  def __call__(self, i) -> dict:
    epoch, step = divmod(int(i), self.steps)
    g = self.global_size
    order = epoch_order(self.seed, epoch, self.size, self.steps * g)
    positions = order[step * g :][:g][self.share]
    return self.read(positions, (self.seed, epoch))


def train_data(
  read: Callable, size: int, batching: Batching, epochs: Epochs, num_workers=0
) -> TrainData:
  """Batches of random windows of a subset of `size` trailers for
  `epochs.count` epochs (see module doc). `read(positions, key)`: the
  batch of those subset positions, windows started at `random_start(key,
  position, ...)`; `num_workers`: processes `iterate` reads in."""
  steps = batching.steps(size)
  batches = _TrainBatches(
    read, size, steps, batching.global_size, batching.share(), epochs.seed
  )
  ds = grain.MapDataset.range(epochs.count * steps).map(batches)
  return TrainData(ds, steps, num_workers)


@dataclasses.dataclass(frozen=True)
class _EvalBatches:
  read: Callable  # (windows [b, 2], position -1 = padding) -> batch.
  windows: np.ndarray  # [steps * global size, 2]
  global_size: int
  share: slice

  def __call__(self, i) -> dict:
    g = self.global_size
    rows = self.windows[int(i) * g :][:g][self.share]
    out = self.read(rows)
    out["trailer"] = rows[:, 0].astype(np.int32)
    out["valid"] = rows[:, 0] >= 0
    return out


def eval_data(read: Callable, lengths, batching: Batching) -> EvalData:
  """Batches of every window (`eval_windows`) of trailers of `lengths`
  clips; `read(windows)` reads the (position, start) rows [b, 2] given
  (position -1: a padding row, its content is the reader's choice)."""
  windows = eval_windows(lengths, batching)
  steps = len(windows) // batching.global_size
  batches = _EvalBatches(read, windows, batching.global_size, batching.share())
  return EvalData(grain.MapDataset.range(steps).map(batches), windows, steps)


# ---------------------------------------------------------------- iterate


def iterate(data, state=None, *, num_threads=2, prefetch=4, num_workers=None):
  """Prefetching iterator over the batches of `data` (TrainData or
  EvalData), optionally restored to `state`.

  `num_workers` > 0 reads batches in that many worker processes (grain
  `mp_prefetch`, `prefetch` batches buffered per worker); None =
  `data.num_workers`. The state is {'next_index': batches consumed} in
  both modes, so a run checkpointed while streaming resumes preloaded and
  vice versa.
  """
  if num_workers is None:
    num_workers = data.num_workers
  if num_workers:
    return WorkerIterator(data.dataset, num_workers, prefetch, state)
  it = iter(
    data.dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    )
  )
  if state is not None:
    it.set_state(state)
  return it


class WorkerIterator:
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
    allow_grain_workers()
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


def allow_grain_workers() -> None:
  """Call before grain `mp_prefetch`. grain 0.2.18 reads this flag there
  without checking that flags were parsed (google/grain#1355, fixed after
  0.2.18): outside absl.app (tests, notebooks, scripts) it then raises.
  Only this one flag is marked given, with its default value."""
  flag = flags.FLAGS["grain_enable_multiprocess_worker_profiling"]
  if not flags.FLAGS.is_parsed() and not flag.present:
    flag.present = 1


# ------------------------------------------------------- picklable sources


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


def picklable(source):
  """`source`, or for a TFDS data source one that worker processes reopen
  (a list or other picklable source is returned as it is)."""
  return _Reopened(source) if hasattr(source, "dataset_info") else source
