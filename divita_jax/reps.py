"""Clip representation stores: ours (one .npy per trailer) and official zarr.

Both expose the same reader interface: `ids()`, `read(id) -> float32
[num_clips, num_features]`, `num_features`. Our store keeps one directory per
backbone tag with one `<id>.npy` per trailer, written atomically (temp file +
rename), so an interrupted extraction never leaves a half-written array and a
rerun skips what exists.
"""

import json
import os
import tempfile

import numpy as np


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

  @property
  def num_features(self) -> int:
    ids = self.ids()
    if not ids:
      raise ValueError(f"Representation store {self.path} is empty.")
    return int(self.read(ids[0], mmap=True).shape[1])

  def write(self, trailer_id: str, array: np.ndarray) -> None:
    array = np.asarray(array, np.float32)
    if array.ndim != 2:
      raise ValueError(
        f"Representations of {trailer_id} must be [clips, features], got "
        f"shape {array.shape}."
      )
    if not np.all(np.isfinite(array)):
      raise ValueError(f"Representations of {trailer_id} contain NaN/inf.")
    fd, tmp = tempfile.mkstemp(dir=self.path, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
      np.save(f, array)
    os.replace(tmp, self._file(trailer_id))

  def read(self, trailer_id: str, mmap: bool = False) -> np.ndarray:
    path = self._file(trailer_id)
    if not os.path.exists(path):
      raise KeyError(f"No representations for {trailer_id} in {self.path}.")
    return np.load(path, mmap_mode="r" if mmap else None)

  def write_manifest(self, info: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=self.path, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
      json.dump(info, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(self.path, "manifest.json"))


class ZarrStore:
  """Reader of an official Trailers12k zarr (v2) representation group."""

  def __init__(self, path: str):
    import zarr  # Imported lazily: only needed for the official reps.

    if not os.path.isdir(path):
      raise FileNotFoundError(f"Zarr representation group {path} not found.")
    self.path = path
    self.tag = os.path.basename(path.rstrip("/")).removesuffix(".zarr")
    self._group = zarr.open_group(path, mode="r")

  def has(self, trailer_id: str) -> bool:
    return trailer_id in self._group

  def ids(self) -> list[str]:
    return sorted(self._group.array_keys())

  @property
  def num_features(self) -> int:
    return int(self._group.attrs["num_features"])

  def read(self, trailer_id: str, mmap: bool = False) -> np.ndarray:
    del mmap
    if trailer_id not in self._group:
      raise KeyError(f"No representations for {trailer_id} in {self.path}.")
    array = np.asarray(self._group[trailer_id][...], np.float32)
    if not np.all(np.isfinite(array)):
      raise ValueError(
        f"Representations of {trailer_id} in {self.path} contain NaN/inf."
      )
    return array


class MemoryStore:
  """In-memory reader with the store interface (used by predict)."""

  def __init__(self, arrays: dict[str, np.ndarray], tag: str = "memory"):
    self.tag = tag
    self._arrays = {k: np.asarray(v, np.float32) for k, v in arrays.items()}

  def has(self, trailer_id: str) -> bool:
    return trailer_id in self._arrays

  def ids(self) -> list[str]:
    return sorted(self._arrays)

  @property
  def num_features(self) -> int:
    return int(next(iter(self._arrays.values())).shape[1])

  def read(self, trailer_id: str, mmap: bool = False) -> np.ndarray:
    del mmap
    if trailer_id not in self._arrays:
      raise KeyError(f"No representations for {trailer_id} in memory.")
    return self._arrays[trailer_id]


class TfdsRepsReader:
  """Reader over the `reps` config of the trailers12k TFDS dataset."""

  def __init__(self, source, ids: list[str], tag: str):
    self.tag = tag
    self._source = source
    self._index = {trailer_id: i for i, trailer_id in enumerate(ids)}

  def has(self, trailer_id: str) -> bool:
    return trailer_id in self._index

  def ids(self) -> list[str]:
    return sorted(self._index)

  @property
  def num_features(self) -> int:
    return int(self.read(next(iter(self._index))).shape[1])

  def read(self, trailer_id: str, mmap: bool = False) -> np.ndarray:
    del mmap
    if trailer_id not in self._index:
      raise KeyError(f"No representations for {trailer_id} in the dataset.")
    return np.asarray(
      self._source[self._index[trailer_id]]["reps"][self.tag], np.float32
    )
