"""The pipelines' shared core: fold data, window planning, padding."""

import numpy as np
import pytest

import tfds_trailers12k
from divita_jax.pipelines import clips, common, reps, stores
from tests.test_pipelines_clips import BRANCHES, CLIPS
from tests.test_pipelines_extraction import record

COUNTS = [2, 0, 5, 1]  # Clips per trailer; trailer 1 has none.
# Windows of 2 clips, 4 a step: 6 windows (trailer 1 one empty window),
# then 2 padding rows.
WINDOWS = [[0, 0], [1, 0], [2, 0], [2, 2], [2, 4], [3, 0], [-1, 0], [-1, 0]]


def test_both_pipelines_plan_the_same_eval_windows(tmp_path, monkeypatch):
  batching = common.Batching(num_clips=2, global_size=4)
  ids = [f"t{i}" for i in range(len(COUNTS))]
  fold = common.FoldData(ids, np.eye(4, 10), {"test": np.arange(4)})
  npy = {"image": stores.NpyStore(str(tmp_path), "image")}
  for tid, n in zip(ids, COUNTS):
    npy["image"].write(tid, np.ones((n, 3), np.float32))
  frozen = reps.eval_data(npy, fold, "test", batching)
  # plan_clips never plans 0 clips for a video: the counts are given.
  source = [record(i, max(n, 1)) for i, n in enumerate(COUNTS)]
  decoder = clips.Decoder(source, BRANCHES, CLIPS)
  monkeypatch.setattr(clips, "clip_counts", lambda d, rows: COUNTS)
  finetune = clips.eval_data(decoder, fold, "test", batching)
  np.testing.assert_array_equal(frozen.windows, WINDOWS)
  np.testing.assert_array_equal(finetune.windows, WINDOWS)
  np.testing.assert_array_equal(common.eval_windows(COUNTS, batching), WINDOWS)
  assert frozen.num_steps == finetune.num_steps == 2
  batch = frozen.dataset[0]  # The empty window: a valid, all-masked row.
  np.testing.assert_array_equal(batch["trailer"], [0, 1, 2, 2])
  assert batch["valid"].all() and not batch["mask"][1].any()


def test_fold_data_normalises_and_checks():
  fold = common.FoldData(
    [b"a", np.array(b"b", object), "c"],
    np.eye(3, 10, dtype=np.int32),
    {"train": [2, 0]},
  )
  assert fold.ids == ("a", "b", "c") and fold.fold is None
  assert fold.labels.dtype == np.float32 and fold.labels.shape == (3, 10)
  assert fold.subsets["train"].dtype == np.int64
  np.testing.assert_array_equal(fold.rows("train"), [2, 0])
  with pytest.raises(ValueError, match="No subset 'test'"):
    fold.rows("test")
  with pytest.raises(ValueError, match="out of range"):
    common.FoldData(["a"], np.zeros((1, 10)), {"train": [1]})
  with pytest.raises(ValueError, match="labels has 2 rows for 1 ids"):
    common.FoldData(["a"], np.zeros((2, 10)), {})
  split = np.array([[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 0, 0]])
  fold = common.FoldData.from_split(list("abcd"), np.zeros((4, 10)), split, 1)
  assert fold.fold == 1 and set(fold.subsets) == {"train", "validation", "test"}
  for name, rows in fold.subsets.items():
    want = tfds_trailers12k.subset_indices(split, 1, name)
    np.testing.assert_array_equal(rows, want)
  np.testing.assert_array_equal(fold.subsets["train"], [2, 3])


def test_random_start_fits_and_depends_on_key_and_position_only():
  starts = [common.random_start((3, 1), p, 10, 4) for p in range(200)]
  assert min(starts) == 0 and max(starts) == 6  # Every start that fits.
  assert starts == [common.random_start((3, 1), p, 10, 4) for p in range(200)]
  assert starts != [common.random_start((3, 2), p, 10, 4) for p in range(200)]
  assert {common.random_start((3, 1), p, 3, 4) for p in range(20)} == {0}


def test_epoch_order_covers_the_subset_then_wraps():
  order = common.epoch_order(7, 0, 10, 12)
  assert sorted(order[:10]) == list(range(10))
  np.testing.assert_array_equal(order[10:], order[:2])
  assert not np.array_equal(order, common.epoch_order(7, 1, 10, 12))
