"""mtgc.csv and metadata.json parsing."""

import json

import numpy as np
import pytest

from tfds_trailers12k import dummy_data, mtgc


def test_read_mtgc_roundtrip(tmp_path):
  labels = np.eye(10, dtype=np.int32)[[0, 9]]
  splits = np.array([[0, 1, 2], [2, 2, 0]], np.int32)
  dummy_data.write_mtgc(tmp_path / "mtgc.csv", ["tt1", "tt2"], labels, splits)
  ann = mtgc.read_mtgc(tmp_path / "mtgc.csv")
  assert ann.ids == ["tt1", "tt2"]
  np.testing.assert_array_equal(ann.labels, labels)
  np.testing.assert_array_equal(ann.splits, splits)


def test_metadata_dict_and_list_forms(tmp_path):
  path = tmp_path / "metadata.json"
  path.write_text(json.dumps({"tt1": {"title": "A", "year": 1990}}))
  assert mtgc.read_metadata(path) == {
    "tt1": {"title": "A", "year": "1990", "imdb_id": "tt1", "youtube_id": ""}
  }
  path.write_text(
    json.dumps([{"imdbId": "tt2", "originalTitle": "B", "trailers": ["y"]}])
  )
  assert mtgc.read_metadata(path)["tt2"]["youtube_id"] == "y"
  assert mtgc.read_metadata(tmp_path / "absent.json") == {}
  path.write_text("{not json")
  with pytest.raises(ValueError, match="metadata.json .* not valid JSON"):
    mtgc.read_metadata(path)


def test_empty_and_missing_csv(tmp_path):
  with pytest.raises(FileNotFoundError, match="mtgc.csv not found"):
    mtgc.read_mtgc(tmp_path / "mtgc.csv")
  (tmp_path / "mtgc.csv").write_text(",".join(mtgc.COLUMNS) + "\n")
  with pytest.raises(ValueError, match="no rows"):
    mtgc.read_mtgc(tmp_path / "mtgc.csv")


def test_rows_with_extra_or_missing_cells_name_the_line(tmp_path):
  path = tmp_path / "mtgc.csv"
  good = "tt1," + ",".join(["0"] * 10) + ",0,1,2"
  path.write_text(",".join(mtgc.COLUMNS) + f"\n{good}\ntt2{good[3:-2]}\n")
  with pytest.raises(ValueError, match="line 3, column 'split2'"):
    mtgc.read_mtgc(path)
  path.write_text(",".join(mtgc.COLUMNS) + f"\n{good}\ntt2{good[3:]},1\n")
  with pytest.raises(ValueError, match=r"line 3: 15 cells, the header has 14"):
    mtgc.read_mtgc(path)
