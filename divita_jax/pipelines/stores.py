"""Clip representation stores behind one reader interface.

Every reader (what reps.py reads, whatever holds the arrays) has:

  ids() -> list[str]     trailer ids, sorted
  has(id) -> bool
  length(id) -> int      number of clips; from metadata where the store can
                         tell (npy header, zarr array shape), without the data
  read(id) -> float32 [clips, num_features]; KeyError naming the id if absent
  num_features: int
  tag: str               the representation's name (backbone tag, zarr group)

Readers: `NpyStore` (ours: one `<root>/<tag>/<id>.npy` per trailer, written
atomically, so an interrupted extraction never leaves a half-written array
and a rerun skips what exists), `ZarrStore` (the official Trailers12k zarr v2
groups, read in place), `MemoryStore` (arrays given in memory, used by
predict) and `InMemoryReader` (any reader's trailers preloaded into one
contiguous buffer: the fast path of the head's input pipeline).
"""

import concurrent.futures
import io
import json
import os
import threading

import numpy as np

from divita_jax import atomic

# np.load parses a .npy header with `ast.literal_eval`, and CPython 3.11's
# AST constructor keeps its recursion depth in per-interpreter state, so two
# threads parsing at once can fail with "SystemError: AST constructor
# recursion depth mismatch" (cpython gh-106905). Headers are therefore
# opened under one lock; the data is read outside it.
_NPY_HEADER_LOCK = threading.Lock()


def group_tag(group: str) -> str:
  """Tag of a zarr group: its directory name without `.zarr`."""
  return os.path.basename(os.fspath(group).rstrip("/")).removesuffix(".zarr")


def _checked(array: np.ndarray, trailer_id: str, where: str) -> np.ndarray:
  if array.ndim != 2:
    raise ValueError(
      f"Representations of {trailer_id} in {where} must be [clips, "
      f"features], got shape {array.shape}."
    )
  if not np.all(np.isfinite(array)):
    raise ValueError(
      f"Representations of {trailer_id} in {where} have NaN/inf."
    )
  return array


class NpyStore:
  """Representation store: `<root>/<tag>/<id>.npy`, float32 [clips, feats]."""

  def __init__(self, root: str, tag: str):
    self.path = os.path.join(root, tag)
    self.tag = tag
    os.makedirs(self.path, exist_ok=True)

  def _file(self, trailer_id: str) -> str:
    return os.path.join(self.path, f"{trailer_id}.npy")

  def has(self, trailer_id: str) -> bool:
    return os.path.exists(self._file(trailer_id))

  def ids(self) -> list[str]:
    return sorted(f[:-4] for f in os.listdir(self.path) if f.endswith(".npy"))

  def _shape(self, trailer_id: str) -> tuple:
    """Shape from the .npy header (memory-mapped: no data is read)."""
    return self.read(trailer_id, mmap=True).shape

  def length(self, trailer_id: str) -> int:
    return int(self._shape(trailer_id)[0])

  @property
  def num_features(self) -> int:
    ids = self.ids()
    if not ids:
      raise ValueError(f"Representation store {self.path} is empty.")
    return int(self._shape(ids[0])[1])

  def write(self, trailer_id: str, array: np.ndarray) -> None:
    array = _checked(np.asarray(array, np.float32), trailer_id, self.path)
    buf = io.BytesIO()
    np.save(buf, array)
    atomic.write_bytes(self._file(trailer_id), buf.getvalue())

  def read(self, trailer_id: str, mmap: bool = False) -> np.ndarray:
    path = self._file(trailer_id)
    if not os.path.exists(path):
      raise KeyError(f"No representations for {trailer_id} in {self.path}.")
    with _NPY_HEADER_LOCK:
      array = np.load(path, mmap_mode="r")
    return array if mmap else np.array(array)

  def write_manifest(self, info: dict) -> None:
    atomic.write_json(
      os.path.join(self.path, "manifest.json"), info, sort_keys=True
    )


class ZarrStore:
  """Reader of an official Trailers12k zarr representation group, in place.

  Zarr v2 groups on a local disk are listed and their array metadata read
  from the `.zarray` files (the v2 format), and a single-chunk array (the
  official layout) is decoded with its numcodecs codec directly: zarr-python
  3 spends ~1.5-4 ms of Python per array read and ~1 ms per metadata lookup,
  5-50x the decode itself, which would starve the head when streaming and
  slow preloading 12,000 trailers. Anything else (v3, several chunks,
  filters, a missing chunk) goes through zarr.
  """

  def __init__(self, path: str):
    path = os.fspath(path)
    if not os.path.isdir(path):
      raise FileNotFoundError(f"Zarr representation group {path} not found.")
    self.path = path
    self.tag = group_tag(path)
    self._v2 = os.path.isfile(os.path.join(path, ".zgroup"))
    self._reset()

  def _reset(self):
    self._group = None  # zarr group, opened on first need in each process.
    self._ids = None  # frozenset of ids, listed once.
    self._meta = {}  # id -> parsed .zarray (v2 only).

  def __getstate__(self):
    # Worker processes get the path only; caches and the zarr group (event
    # loop and file handles) are rebuilt there on first use.
    return {"path": self.path, "tag": self.tag, "_v2": self._v2}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._reset()

  def _zarr(self):
    if self._group is None:
      import zarr  # Imported lazily: only the official reps need zarr.

      self._group = zarr.open_group(self.path, mode="r")
    return self._group

  def _id_set(self) -> frozenset:
    if self._ids is None:
      if self._v2:
        self._ids = frozenset(
          d
          for d in os.listdir(self.path)
          if os.path.isfile(os.path.join(self.path, d, ".zarray"))
        )
      else:
        self._ids = frozenset(self._zarr().array_keys())
    return self._ids

  def has(self, trailer_id: str) -> bool:
    return trailer_id in self._id_set()

  def ids(self) -> list[str]:
    return sorted(self._id_set())

  def _check_has(self, trailer_id: str) -> None:
    if trailer_id not in self._id_set():
      raise KeyError(f"No representations for {trailer_id} in {self.path}.")

  def _v2_meta(self, trailer_id: str) -> dict:
    if trailer_id not in self._meta:
      with open(os.path.join(self.path, trailer_id, ".zarray")) as f:
        self._meta[trailer_id] = json.load(f)
    return self._meta[trailer_id]

  def length(self, trailer_id: str) -> int:
    self._check_has(trailer_id)
    if self._v2:
      return int(self._v2_meta(trailer_id)["shape"][0])
    return int(self._zarr()[trailer_id].shape[0])

  @property
  def num_features(self) -> int:
    attrs = os.path.join(self.path, ".zattrs")
    if self._v2 and os.path.isfile(attrs):
      with open(attrs) as f:
        dim = json.load(f).get("num_features")
    else:
      dim = self._zarr().attrs.get("num_features")
    if dim is None:  # Not recorded: the first array's width.
      ids = self.ids()
      if not ids:
        raise ValueError(f"Zarr representation group {self.path} is empty.")
      dim = self._v2_meta(ids[0])["shape"][1] if self._v2 else None
      dim = dim or self._zarr()[ids[0]].shape[1]
    return int(dim)

  def _read_chunk(self, trailer_id: str) -> np.ndarray | None:
    """The array decoded from its only chunk; None if not that layout."""
    meta = self._v2_meta(trailer_id)
    shape, dtype = meta["shape"], np.dtype(meta["dtype"])
    if (
      meta["chunks"] != shape
      or meta.get("filters")
      or meta.get("order", "C") != "C"
      or dtype.kind != "f"
    ):
      return None
    sep = meta.get("dimension_separator") or "."
    chunk = os.path.join(self.path, trailer_id, sep.join("0" * len(shape)))
    if not os.path.isfile(chunk):
      return None  # Never written: zarr returns the fill value.
    with open(chunk, "rb") as f:
      data = f.read()
    if meta.get("compressor"):
      import numcodecs  # zarr's codecs.

      data = numcodecs.get_codec(meta["compressor"]).decode(data)
    return np.frombuffer(data, dtype).reshape(shape)

  def read(self, trailer_id: str) -> np.ndarray:
    self._check_has(trailer_id)
    array = self._read_chunk(trailer_id) if self._v2 else None
    if array is None:
      array = self._zarr()[trailer_id][...]
    return _checked(np.asarray(array, np.float32), trailer_id, self.path)


class MemoryStore:
  """In-memory reader with the store interface (used by predict)."""

  def __init__(self, arrays: dict[str, np.ndarray], tag: str = "memory"):
    self.tag = tag
    self._arrays = {k: np.asarray(v, np.float32) for k, v in arrays.items()}

  def has(self, trailer_id: str) -> bool:
    return trailer_id in self._arrays

  def ids(self) -> list[str]:
    return sorted(self._arrays)

  def length(self, trailer_id: str) -> int:
    return int(self.read(trailer_id).shape[0])

  @property
  def num_features(self) -> int:
    return int(next(iter(self._arrays.values())).shape[1])

  def read(self, trailer_id: str) -> np.ndarray:
    if trailer_id not in self._arrays:
      raise KeyError(f"No representations for {trailer_id} in memory.")
    return self._arrays[trailer_id]


def read(reader, trailer_id: str) -> np.ndarray:
  """[clips, D] from any reader; memory-mapped where the reader offers it."""
  if isinstance(reader, NpyStore):
    array = reader.read(trailer_id, mmap=True)
  else:
    array = reader.read(trailer_id)
  if array.ndim != 2:
    raise ValueError(
      f"Representations of {trailer_id} must be [clips, features], got "
      f"shape {array.shape}."
    )
  return array


def length(reader, trailer_id: str) -> int:
  """Number of clips; readers without `length` (e.g. test wrappers that
  only offer `read`) are read."""
  if hasattr(reader, "length"):
    return int(reader.length(trailer_id))
  return int(read(reader, trailer_id).shape[0])


class InMemoryReader:
  """Any reader's trailers preloaded into one contiguous buffer.

  The buffer ([total clips, D] float32) is allocated once from the lengths
  and each trailer is read straight into its rows, so loading peaks at the
  representations' size plus one trailer per thread.
  """

  def __init__(self, reader, ids, num_threads: int = 8):
    ids = list(ids)
    sizes = np.array([length(reader, t) for t in ids], np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    self.data = np.empty((starts[-1], reader.num_features), np.float32)
    self.num_features = int(self.data.shape[1])
    self.tag = getattr(reader, "tag", "memory")

    def fill(k):
      rows = self.data[starts[k] : starts[k + 1]]
      array = read(reader, ids[k])
      if array.shape != rows.shape:
        raise ValueError(
          f"Representations of {ids[k]} in {self.tag}: shape {array.shape}, "
          f"but the store's metadata says {rows.shape}."
        )
      rows[...] = array

    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
      list(pool.map(fill, range(len(ids))))
    self._offsets = dict(zip(ids, starts[:-1]))
    self._sizes = dict(zip(ids, sizes))

  def ids(self) -> list[str]:
    return sorted(self._offsets)

  def has(self, trailer_id: str) -> bool:
    return trailer_id in self._offsets

  def length(self, trailer_id: str) -> int:
    self._check(trailer_id)
    return int(self._sizes[trailer_id])

  def _check(self, trailer_id: str) -> None:
    if trailer_id not in self._offsets:
      raise KeyError(f"No preloaded representations for {trailer_id}.")

  def read(self, trailer_id: str) -> np.ndarray:
    self._check(trailer_id)
    start = self._offsets[trailer_id]
    return self.data[start : start + self._sizes[trailer_id]]

  def locate(self, trailer_ids) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, sizes) [n] of the trailers' rows in `data`."""
    for t in trailer_ids:
      self._check(t)
    return (
      np.array([self._offsets[t] for t in trailer_ids], np.int64),
      np.array([self._sizes[t] for t in trailer_ids], np.int64),
    )
