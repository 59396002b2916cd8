"""Synthetic trailers12k: generator properties, build, index and folds."""

import numpy as np
import pytest

import tfds_trailers12k
from tfds_trailers12k import synthetic
from tfds_trailers12k.genres import NUM_GENRES


def test_labels_and_folds_like_trailers12k():
  cfg = synthetic.SyntheticConfig(num_trailers=400, seed=1)
  labels = synthetic.sample_labels(cfg)
  assert labels.shape == (400, NUM_GENRES) and labels.dtype == np.int32
  assert set(labels.sum(1)) == {1, 2, 3}
  freq = labels.mean(0)
  assert freq[4] > 2 * freq[5]  # Drama common, fantasy rare (imbalance).
  folds = synthetic.sample_folds(labels, cfg.seed)
  for f in range(3):
    share = np.bincount(folds[:, f], minlength=3) / 400
    np.testing.assert_allclose(share, [0.7, 0.1, 0.2], atol=0.03)
  assert not np.array_equal(folds[:, 0], folds[:, 1])  # Different folds.
  np.testing.assert_array_equal(labels, synthetic.sample_labels(cfg))


def test_trailer_is_deterministic_and_genre_styled():
  cfg = synthetic.SyntheticConfig(num_trailers=2, min_seconds=2, max_seconds=3)
  horror = np.eye(NUM_GENRES, dtype=np.int32)[6]
  comedy = np.eye(NUM_GENRES, dtype=np.int32)[2]
  a = synthetic.make_trailer(0, cfg, horror)
  b = synthetic.make_trailer(0, cfg, horror)
  assert a["video"] == b["video"]
  np.testing.assert_array_equal(a["true_shots"], b["true_shots"])
  assert a["video"][4:8] == b"ftyp"  # Real mp4.
  # The look carries the genre: horror is dark, comedy bright.
  p = synthetic._shot_params(np.random.default_rng(0), ["horror"])
  q = synthetic._shot_params(np.random.default_rng(0), ["comedy"])
  dark = synthetic._render(p, 0, cfg).mean()
  bright = synthetic._render(q, 0, cfg).mean()
  assert dark < 0.5 * bright
  c = synthetic.make_trailer(0, cfg, comedy)
  assert c["video"] != a["video"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  builder = tfds_trailers12k.build(
    "synthetic", data_dir, num_trailers=6, num_workers=1
  )
  return builder, data_dir


def test_build_features_and_index(built):
  builder, _ = built
  assert builder.info.metadata["skipped"] == []
  source = tfds_trailers12k.data_source(builder)
  index = tfds_trailers12k.load_index(builder)
  assert len(source) == 6 == len(index["ids"])
  assert index["labels"].shape == (6, 10)
  assert index["split_assignment"].shape == (6, 3)
  for i in (0, 5):  # Index is in record order of the data source.
    ex = source[i]
    assert ex["id"].decode() == index["ids"][i]
    np.testing.assert_array_equal(ex["labels"], index["labels"][i])
    assert len(ex["shots"]) == index["num_shots"][i]
    assert ex["video"][4:8] == b"ftyp"
    shots = ex["shots"]
    assert shots[0, 0] == 0 and shots[-1, 1] == ex["num_frames"]
    np.testing.assert_array_equal(shots[1:, 0], shots[:-1, 1])
    assert ex["true_shots"].shape[1] == 2 and ex["fps"] == 24.0
    assert (ex["height"], ex["width"]) == (72, 96)
    assert ex["title"].startswith(b"Synthetic trailer")


def test_index_is_cached_and_sizes_do_not_share_a_build(built, tmp_path):
  builder, data_dir = built
  first = tfds_trailers12k.load_index(builder)
  again = tfds_trailers12k.load_index(builder)  # From index.npz.
  assert first["ids"] == again["ids"]
  rebuilt = tfds_trailers12k.build("synthetic", data_dir, num_trailers=6)
  assert rebuilt.data_dir == builder.data_dir  # Reused, not regenerated.
  other = tfds_trailers12k.make_config("synthetic", num_trailers=7)
  assert other.name != builder.builder_config.name
  assert tfds_trailers12k.make_config("synthetic").name == "synthetic"


def test_subset_indices_partition_each_fold():
  splits = np.array([[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 0, 0]], np.int32)
  for fold in range(3):
    parts = [
      tfds_trailers12k.subset_indices(splits, fold, s)
      for s in ("train", "validation", "test")
    ]
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), range(4))
  np.testing.assert_array_equal(
    tfds_trailers12k.subset_indices(splits, 1, "test"), [1]
  )
  with pytest.raises(ValueError, match="fold must be"):
    tfds_trailers12k.subset_indices(splits, 3, "train")
  with pytest.raises(ValueError, match="subset must be"):
    tfds_trailers12k.subset_indices(splits, 0, "val")
  with pytest.raises(ValueError, match="must be"):
    tfds_trailers12k.subset_indices(splits[:, :2], 0, "train")


def test_bad_config_names_and_fields():
  with pytest.raises(ValueError, match="Unknown trailers12k config"):
    tfds_trailers12k.make_config("videos")
  with pytest.raises(ValueError, match="num_trailer"):
    tfds_trailers12k.make_config("synthetic", num_trailer=3)
