"""Representation pipeline: windows, masks, determinism, state, processes."""

import jax
import numpy as np
import pytest

from divita_jax import hosts
from divita_jax.pipelines import common, reps, stores

NUM_CLIPS = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """12 trailers of 2..9 clips; feature 0 = trailer row, 1 = clip index."""
  root = str(tmp_path_factory.mktemp("reps"))
  npy = {b: stores.NpyStore(root, b) for b in ("image", "video")}
  ids = [f"tt{i:04d}" for i in range(12)]
  for i, tid in enumerate(ids):
    n = 2 + (i * 5) % 8
    clips = np.stack([np.full(n, i), np.arange(n), np.ones(n)], 1)
    npy["image"].write(tid, clips)
    npy["video"].write(tid, -clips)
  labels = np.eye(12, 10, dtype=np.float32)
  return npy, ids, labels


def _fold(data, subset="train", indices=None, labels=None):
  _, ids, all_labels = data
  indices = np.arange(12) if indices is None else indices
  labels = all_labels if labels is None else labels
  return common.FoldData(ids, labels, {subset: indices})


def _train(data, process_index=0, process_count=1, indices=None, epochs=2):
  return reps.train_data(
    data[0],
    _fold(data, indices=indices),
    common.Batching(NUM_CLIPS, 4, process_index, process_count),
    common.Epochs(seed=3, count=epochs),
  )


def _check_window(batch, stores_ids):
  """Contiguous windows of the right trailer, zero padding, exact mask."""
  for row in range(len(batch["mask"])):
    img, mask = batch["image"][row], batch["mask"][row]
    trailer = int(img[0, 0])
    n = 2 + (trailer * 5) % 8
    assert mask.sum() == min(n, NUM_CLIPS)
    assert np.all(img[~mask] == 0)
    clip = img[mask, 1]
    np.testing.assert_array_equal(clip, clip[0] + np.arange(len(clip)))
    assert clip[-1] < n
    np.testing.assert_array_equal(batch["video"][row], -img)
    np.testing.assert_array_equal(
      batch["labels"][row],
      np.eye(10)[trailer] if trailer < 10 else np.zeros(10),
    )


def test_train_windows_masks_and_epoch_coverage(data):
  train = _train(data)
  assert train.steps_per_epoch == 3
  for epoch in range(2):
    seen = []
    for step in range(3):
      batch = train.dataset[epoch * 3 + step]
      assert batch["image"].shape == (4, NUM_CLIPS, 3)
      assert batch["mask"].dtype == bool
      assert batch["labels"].dtype == np.float32
      _check_window(batch, data[1])
      seen += list(batch["image"][:, 0, 0].astype(int))
    assert sorted(seen) == list(range(12))  # Every trailer once per epoch.


def test_train_deterministic_and_reshuffled_per_epoch(data):
  a, b = _train(data), _train(data)
  for i in range(6):
    for k in a.dataset[i]:
      np.testing.assert_array_equal(a.dataset[i][k], b.dataset[i][k])
  first = [a.dataset[i]["image"][:, 0, 0] for i in range(3)]
  second = [a.dataset[3 + i]["image"][:, 0, 0] for i in range(3)]
  assert not np.array_equal(np.concatenate(first), np.concatenate(second))


def test_two_processes_split_every_global_batch(data):
  whole = _train(data)
  parts = [_train(data, p, 2) for p in range(2)]
  for i in range(6):
    for k in ("image", "video", "mask", "labels"):
      joined = np.concatenate([p.dataset[i][k] for p in parts])
      np.testing.assert_array_equal(joined, whole.dataset[i][k])
    assert len(parts[0].dataset[i]["mask"]) == 2


def test_last_batch_wraps_so_every_trailer_is_seen(data):
  train = _train(data, indices=np.arange(10))  # 10 trailers, batches of 4.
  seen = np.concatenate(
    [train.dataset[i]["image"][:, 0, 0] for i in range(3)]
  ).astype(int)
  assert len(seen) == 12 and set(seen) == set(range(10))


def test_iterator_state_restores_exactly(data):
  train = _train(data)
  it = common.iterate(train)
  for _ in range(4):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  resumed = common.iterate(train, state=state)
  for want in expected:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_eval_covers_every_clip_once_and_pads(data):
  indices = np.array([1, 4, 7, 10])
  fold = _fold(data, "validation", indices)
  parts = [
    reps.eval_data(
      data[0], fold, "validation", common.Batching(NUM_CLIPS, 4, p, 2)
    )
    for p in range(2)
  ]
  assert parts[0].num_steps == parts[1].num_steps
  clips = {}
  for step in range(parts[0].num_steps):
    batch = {
      k: np.concatenate([p.dataset[step][k] for p in parts])
      for k in parts[0].dataset[step]
    }
    for row in range(4):
      pos = batch["trailer"][row]
      assert batch["valid"][row] == (pos >= 0)
      if pos < 0:
        continue
      img, mask = batch["image"][row], batch["mask"][row]
      assert np.all(img[:, 0][mask] == indices[pos])
      assert np.all(img[~mask] == 0)
      clips.setdefault(int(pos), []).extend(img[mask, 1].astype(int))
  for pos, i in enumerate(indices):
    assert clips[pos] == list(range(2 + (i * 5) % 8))
  # 7 windows (2 + 2 + 2 + 1) padded to 2 global batches of 4.
  np.testing.assert_array_equal(parts[0].windows[:, 0] == -1, np.arange(8) == 7)


def test_preload_fast_path_reads_the_same(data):
  npy, ids, _ = data
  memory = reps.preload(npy, ids)
  assert isinstance(memory["image"], stores.InMemoryReader)
  a = _train(data)
  fold = _fold(data)
  b = reps.train_data(
    memory, fold, common.Batching(NUM_CLIPS, 4), common.Epochs(3, 2)
  )
  evals = [
    reps.eval_data(r, fold, "train", common.Batching(NUM_CLIPS, 4))
    for r in (npy, memory)
  ]
  pairs = [(a.dataset[i], b.dataset[i]) for i in range(6)]
  pairs += [
    (evals[0].dataset[i], evals[1].dataset[i])
    for i in range(evals[0].num_steps)
  ]
  for x, y in pairs:
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
      assert x[k].dtype == y[k].dtype


def test_train_stacks_equal_the_stacked_batches(data):
  npy, ids, _ = data
  memory, fold = reps.preload(npy, ids), _fold(data)
  epochs = common.Epochs(3, 2)  # 3 steps per epoch.
  assert reps.train_stacks(npy, fold, common.Batching(4, 4), epochs) is None
  for process in (0, 1):
    batching = common.Batching(NUM_CLIPS, 4, process, 2)
    train = reps.train_data(memory, fold, batching, epochs)
    stacks = reps.train_stacks(memory, fold, batching, epochs)
    # Across the epoch boundary, the wrapped last batch, one step.
    for first, n in ((0, 3), (2, 2), (5, 1)):
      want = [train.dataset[i] for i in range(first, first + n)]
      got = stacks(first, n)
      assert got.keys() == want[0].keys()
      for k, v in got.items():
        np.testing.assert_array_equal(v, np.stack([w[k] for w in want]))
        assert v.dtype == want[0][k].dtype
      for b in npy:  # Aligned: the CPU backend takes them without a copy.
        assert got[b].ctypes.data % hosts.ALIGNMENT == 0
        on_device = jax.device_put(got[b])
        assert on_device.unsafe_buffer_pointer() == got[b].ctypes.data
  with pytest.raises(IndexError, match="outside the 6 steps"):
    stacks(5, 2)


def test_bad_inputs_have_clear_errors(data):
  npy, _, labels = data
  epochs = common.Epochs(seed=0, count=1)
  with pytest.raises(ValueError, match="labels has 3 rows"):
    reps.train_data(
      npy,
      _fold(data, indices=[0], labels=labels[:3]),
      common.Batching(4, 2),
      epochs,
    )
  with pytest.raises(ValueError, match="not divisible by the 3 processes"):
    reps.train_data(
      npy, _fold(data, indices=[0]), common.Batching(4, 4, 0, 3), epochs
    )
  with pytest.raises(ValueError, match="empty"):
    reps.eval_data(npy, _fold(data, "test", []), "test", common.Batching(4, 2))


def _zarr_copy(npy, ids, root):
  """The stores' arrays as official-layout zarr v2 groups, one per branch."""
  import zarr

  out = {}
  for b, store in npy.items():
    path = str(root / f"trailers_{b}.zarr")
    group = zarr.open_group(path, mode="w", zarr_format=2)
    group.attrs["num_features"] = store.num_features
    for tid in ids:
      array = store.read(tid)
      group.create_array(tid, data=array, chunks=array.shape)
    out[b] = stores.ZarrStore(path)
  return out


def test_zarr_streams_in_worker_processes_in_order_and_restores(data, tmp_path):
  npy, ids, _ = data
  zarrs = _zarr_copy(npy, ids, tmp_path)
  train = reps.train_data(
    zarrs,
    _fold(data),
    common.Batching(NUM_CLIPS, 4),
    common.Epochs(seed=3, count=2),
    num_workers=2,
  )
  assert train.num_workers == 2
  expected = [_train(data).dataset[i] for i in range(6)]  # From .npy.
  it = common.iterate(train)
  assert isinstance(it, common.WorkerIterator)  # Processes.
  got = [next(it) for _ in range(3)]
  state = it.get_state()
  assert state == {"next_index": 3}
  it.close()
  # Restored in worker processes and in threads (a run may resume
  # preloaded): the same batches in the same order.
  for workers in (2, 0):
    resumed = common.iterate(train, state=state, num_workers=workers)
    batches = got + [next(resumed) for _ in range(3)]
    for want, x in zip(expected, batches):
      for k in want:
        np.testing.assert_array_equal(x[k], want[k])
    del resumed


def test_default_workers_only_for_zarr_train_data(data, tmp_path):
  npy, ids, _ = data
  zarrs = _zarr_copy(npy, ids, tmp_path)
  args = (_fold(data), common.Batching(NUM_CLIPS, 4), common.Epochs(0, 1))
  streamed = reps.train_data(zarrs, *args)
  assert streamed.num_workers >= 1
  for readers in (npy, reps.preload(zarrs, ids)):
    local = reps.train_data(readers, *args)
    assert local.num_workers == 0


def test_preload_fills_one_buffer_from_lengths(data, tmp_path):
  npy, ids, _ = data
  zarrs = _zarr_copy(npy, ids, tmp_path)
  memory = reps.preload(zarrs, ids)["image"]
  total = sum(npy["image"].length(t) for t in ids)
  assert memory.data.shape == (total, 3) and memory.data.flags.c_contiguous
  for tid in ids:
    view = memory.read(tid)
    assert view.base is memory.data or view.base is memory.data.base
    np.testing.assert_array_equal(view, npy["image"].read(tid))
    assert memory.length(tid) == len(view)
