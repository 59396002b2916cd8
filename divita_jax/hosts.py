"""Per-process (host) shares of work and data, and global batches.

The one place that decides which trailers and batch rows a process owns:
dataset preparation and extraction split trailers with `process_shard`;
the head's loaders give each process the rows `process_rows` of every
global batch; `global_batch` assembles the processes' rows into one
jax.Array split along the mesh's data axis (`aligned_empty` arrays without
a copy on CPU). `agree` makes process 0's view of the filesystem
everyone's.
"""

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from divita_jax.sharding import batch_axes


def _index_count(process_index, process_count) -> tuple[int, int]:
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(
      f"process_index {process_index} not in [0, {process_count})"
    )
  return process_index, process_count


def process_shard(
  indices: np.ndarray,
  process_index: int | None = None,
  process_count: int | None = None,
) -> np.ndarray:
  """This process's share of `indices`: every process_count-th one.

  Shares of different processes are disjoint, their union is `indices` and
  their sizes differ by at most one. Defaults: jax.process_index() /
  jax.process_count().
  """
  process_index, process_count = _index_count(process_index, process_count)
  return np.asarray(indices)[process_index::process_count]


def process_rows(
  global_batch_size: int,
  process_index: int | None = None,
  process_count: int | None = None,
) -> slice:
  """Rows of every global batch that this process loads."""
  process_index, process_count = _index_count(process_index, process_count)
  if global_batch_size % process_count:
    raise ValueError(
      f"global_batch_size {global_batch_size} is not divisible by the "
      f"{process_count} processes."
    )
  local = global_batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


# XLA:CPU aliases a numpy array with this alignment instead of copying it.
ALIGNMENT = 64


def aligned_empty(shape, dtype) -> np.ndarray:
  """An uninitialised array whose data starts on an `ALIGNMENT`-byte
  boundary: `global_batch` / `jax.device_put` on the CPU backend then use
  its memory as it is (numpy's own allocations are 16-byte aligned, and a
  dispatch's 8 x 32 x 30 x 768 float32 windows took 13 ms to copy)."""
  dtype = np.dtype(dtype)
  size = int(np.prod(shape)) * dtype.itemsize
  raw = np.empty(size + ALIGNMENT, np.uint8)
  start = -raw.ctypes.data % ALIGNMENT
  return raw[start : start + size].view(dtype).reshape(shape)


def global_batch(
  local_batch: dict[str, np.ndarray], mesh: Mesh, data_axis=None
) -> dict[str, jax.Array]:
  """Per-process numpy batch -> global jax.Arrays split along `data_axis`
  (default: the mesh's batch axes, `sharding.batch_axes`).

  Each process passes its own rows; the global batch is their concatenation
  in process order (global rows = local rows * process_count).
  """
  sharding = NamedSharding(mesh, PartitionSpec(data_axis or batch_axes(mesh)))
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
    for k, v in local_batch.items()
  }


def agree(value) -> np.ndarray:
  """Process 0's value (a numpy array) on every process.

  Decisions taken from the filesystem (a fold is finished, which trailers
  have representations, the latest checkpoint) can differ between hosts
  under attribute caching (NFS, gcsfuse); deciding on process 0 keeps every
  process in the same collectives.
  """
  value = np.asarray(value)
  if jax.process_count() == 1:
    return value
  return np.asarray(multihost_utils.broadcast_one_to_all(value))


def agree_steps(steps, capacity: int = 64) -> list[int]:
  """Process 0's list of checkpoint steps (ints >= 0) on every process."""
  padded = np.full(capacity, -1, np.int64)
  steps = sorted(steps)[-capacity:]
  padded[: len(steps)] = steps
  return [int(s) for s in agree(padded) if s >= 0]
