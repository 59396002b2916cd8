"""Representation stores: our .npy store and the official zarr v2 groups."""

import os

import numpy as np
import pytest
import zarr

from divita_jax import reps


def test_npy_store_round_trip_and_atomic_files(tmp_path):
  store = reps.NpyStore(str(tmp_path), "image_vit")
  x = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
  store.write("tt01", x)
  assert store.has("tt01") and not store.has("tt02")
  np.testing.assert_array_equal(store.read("tt01"), x)
  assert store.ids() == ["tt01"] and store.num_features == 5
  assert not [f for f in os.listdir(store.path) if f.endswith(".tmp")]


def test_npy_store_rejects_bad_arrays(tmp_path):
  store = reps.NpyStore(str(tmp_path), "video")
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
  store = reps.ZarrStore(path)
  assert store.tag == "trailers_i_swin_fpc24"
  assert store.ids() == ["tt0000002", "tt0347149"]
  assert store.num_features == 4 and store.has("tt0347149")
  np.testing.assert_array_equal(store.read("tt0347149"), x)


def test_zarr_store_errors_name_the_id(tmp_path):
  bad = np.array([[0.0, np.inf, 0.0, 0.0]], np.float32)
  path = _official_group(str(tmp_path / "g.zarr"), {"tt9": bad})
  store = reps.ZarrStore(path)
  with pytest.raises(ValueError, match="tt9.*NaN/inf"):
    store.read("tt9")
  with pytest.raises(KeyError, match="tt8"):
    store.read("tt8")
  with pytest.raises(FileNotFoundError, match="missing.zarr"):
    reps.ZarrStore(str(tmp_path / "missing.zarr"))
