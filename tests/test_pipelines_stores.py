"""Representation stores: our .npy store and the official zarr v2 groups."""

import gc
import os
import pickle
import sys
import threading

import numpy as np
import pytest
import zarr

from divita_jax.pipelines import stores


def test_npy_store_round_trip_and_atomic_files(tmp_path):
  store = stores.NpyStore(str(tmp_path), "image_vit")
  x = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
  store.write("tt01", x)
  assert store.has("tt01") and not store.has("tt02")
  np.testing.assert_array_equal(store.read("tt01"), x)
  assert store.ids() == ["tt01"] and store.num_features == 5
  assert store.length("tt01") == 7
  assert not [f for f in os.listdir(store.path) if f.endswith(".tmp")]
  mode = os.stat(os.path.join(store.path, "tt01.npy")).st_mode & 0o777
  assert mode == 0o644 & ~_umask()  # Readable by other users and hosts.


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def test_npy_store_rejects_bad_arrays(tmp_path):
  store = stores.NpyStore(str(tmp_path), "video")
  with pytest.raises(ValueError, match="tt03.*NaN"):
    store.write("tt03", np.array([[0.0, np.nan]]))
  with pytest.raises(ValueError, match="tt04.*clips, features"):
    store.write("tt04", np.zeros(3))
  with pytest.raises(KeyError, match="tt05"):
    store.read("tt05")


def _official_group(path, arrays):
  group = zarr.open_group(path, mode="w", zarr_format=2)
  group.attrs["num_features"] = 4
  for mid, array in arrays.items():
    group.create_array(mid, data=array, chunks=array.shape)
  return path


def test_zarr_store_reads_official_v2_layout(tmp_path):
  x = np.arange(12, dtype=np.float32).reshape(3, 4)
  path = _official_group(
    str(tmp_path / "trailers_i_swin_fpc24.zarr"),
    {"tt0347149": x, "tt0000002": x + 1},
  )
  assert os.path.exists(os.path.join(path, ".zgroup"))  # Format v2.
  store = stores.ZarrStore(path)
  assert store.tag == "trailers_i_swin_fpc24"
  assert store.ids() == ["tt0000002", "tt0347149"]
  assert store.num_features == 4 and store.has("tt0347149")
  np.testing.assert_array_equal(store.read("tt0347149"), x)
  assert store.length("tt0347149") == 3
  # The official layout (one chunk per trailer) is decoded without zarr.
  np.testing.assert_array_equal(store._read_chunk("tt0347149"), x)


def test_zarr_store_errors_name_the_id(tmp_path):
  bad = np.array([[0.0, np.inf, 0.0, 0.0]], np.float32)
  path = _official_group(str(tmp_path / "g.zarr"), {"tt9": bad})
  store = stores.ZarrStore(path)
  with pytest.raises(ValueError, match="tt9.*NaN/inf"):
    store.read("tt9")
  with pytest.raises(KeyError, match="tt8"):
    store.read("tt8")
  with pytest.raises(FileNotFoundError, match="missing.zarr"):
    stores.ZarrStore(str(tmp_path / "missing.zarr"))


def test_zarr_store_other_layouts_read_through_zarr(tmp_path):
  """Several chunks, filters and zarr v3 take zarr's own path; the same
  arrays come out, and lengths come from metadata alone."""
  x = np.random.default_rng(0).normal(size=(9, 4)).astype(np.float32)
  v2 = zarr.open_group(str(tmp_path / "v2.zarr"), mode="w", zarr_format=2)
  v2.create_array("chunked", data=x, chunks=(4, 4))
  v2.create_array("one", data=x, chunks=x.shape)
  v2.create_array("f64", data=x.astype(np.float64), chunks=x.shape)
  v3 = zarr.open_group(str(tmp_path / "v3.zarr"), mode="w", zarr_format=3)
  v3.create_array("tt1", data=x, chunks=(4, 4))
  store2 = stores.ZarrStore(str(tmp_path / "v2.zarr"))
  store3 = stores.ZarrStore(str(tmp_path / "v3.zarr"))
  for store, tid in ((store2, "chunked"), (store2, "one"), (store2, "f64")):
    np.testing.assert_array_equal(store.read(tid), x)
    assert store.read(tid).dtype == np.float32
  np.testing.assert_array_equal(store3.read("tt1"), x)
  assert store3.ids() == ["tt1"] and store3.length("tt1") == 9
  assert store3.num_features == 4 and store2.num_features == 4  # No attrs.
  os.remove(tmp_path / "v2.zarr" / "one" / "0.0")  # Data gone, shape known.
  assert store2.length("one") == 9
  with pytest.raises(KeyError, match="tt9"):
    store2.length("tt9")


def test_zarr_store_pickles_without_its_group(tmp_path):
  x = np.arange(8, dtype=np.float32).reshape(2, 4)
  path = _official_group(str(tmp_path / "g.zarr"), {"tt1": x})
  store = stores.ZarrStore(path)
  store.read("tt1")
  copy = pickle.loads(pickle.dumps(store))  # What worker processes get.
  assert copy.tag == "g" and copy.ids() == ["tt1"]
  np.testing.assert_array_equal(copy.read("tt1"), x)


def test_in_memory_reader_checks_lengths_and_names_missing_ids(tmp_path):
  store = stores.NpyStore(str(tmp_path), "image")
  store.write("a", np.ones((3, 2)))
  store.write("b", np.zeros((1, 2)))
  memory = stores.InMemoryReader(store, ["a", "b"])
  assert memory.data.shape == (4, 2) and memory.length("a") == 3
  np.testing.assert_array_equal(memory.read("b"), np.zeros((1, 2)))
  offsets, sizes = memory.locate(["b", "a"])
  assert list(offsets) == [3, 0] and list(sizes) == [1, 3]
  with pytest.raises(KeyError, match="No preloaded representations for c"):
    memory.read("c")
  with pytest.raises(KeyError, match="No representations for c"):
    stores.InMemoryReader(store, ["a", "c"])


class _Cycle:
  """A reference cycle whose finalizer runs Python code when collected."""

  def __init__(self):
    self.me = self

  def __del__(self):
    [0] * 8


def test_npy_headers_parse_safely_from_many_threads(tmp_path):
  """InMemoryReader reads headers from a thread pool; CPython 3.11's AST
  state is per interpreter, so unlocked concurrent np.load headers fail
  with "AST constructor recursion depth mismatch" once a GC finalizer
  switches threads mid-parse (seen in CI). A tiny switch interval and a
  GC that runs often make that switch frequent."""
  store = stores.NpyStore(str(tmp_path), "tag")
  for k in range(8):
    store.write(f"t{k}", np.full((k + 1, 3), k, np.float32))
  errors = []

  def work(k):
    for _ in range(4000):
      try:
        array = store.read(f"t{k % 8}", mmap=True)
        assert array.shape == (k % 8 + 1, 3)
        _Cycle(), _Cycle()
      except SystemError as e:
        errors.append(e)
        return

  interval, threshold = sys.getswitchinterval(), gc.get_threshold()
  sys.setswitchinterval(1e-6)
  gc.set_threshold(5)
  try:
    threads = [threading.Thread(target=work, args=(k,)) for k in range(16)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
  finally:
    sys.setswitchinterval(interval)
    gc.set_threshold(*threshold)
  assert not errors, errors[0]
  np.testing.assert_array_equal(store.read("t3"), np.full((4, 3), 3))
  assert not isinstance(store.read("t3"), np.memmap)
