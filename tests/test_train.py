"""Trainer: PyTorch-parity optimizer and plateau, learning, exact resume."""

import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest
import torch

from divita_jax import metrics, sharding
from divita_jax.configs import divita as divita_config
from divita_jax.pipelines import common, stores
from divita_jax.trainers import checkpoints, frozen, loop, optim, param_groups
from tests.conftest import SigtermAfter


def test_adamw_amsgrad_matches_torch():
  rng = np.random.default_rng(0)
  p0 = rng.normal(size=(7,)).astype(np.float32)
  scale = np.array([[1], [3], [0.1], [2], [0.5], [1]], np.float32)
  grads = rng.normal(size=(6, 7)).astype(np.float32) * scale
  config = divita_config.get_config()
  config.train.learning_rate = 1e-2
  tx = param_groups.make_optimizer(config)
  params = jax.numpy.asarray(p0)
  state = tx.init(params)
  tp = torch.nn.Parameter(torch.tensor(p0))
  opt = torch.optim.AdamW(
    [tp], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, amsgrad=True
  )
  for g in grads:
    updates, state = tx.update(jax.numpy.asarray(g), state, params)
    params = params + updates
    tp.grad = torch.tensor(g)
    opt.step()
  np.testing.assert_allclose(params, tp.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_plateau_matches_torch_and_early_stopping():
  tc = ml_collections.ConfigDict(
    dict(plateau_patience=2, plateau_factor=0.1, plateau_threshold=1e-4)
  )
  losses = [1.0, 0.9, 0.89995, 0.9, 0.95, 0.8, 0.81, 0.82, 0.83, 0.84, 0.7]
  p = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.SGD([p], lr=1e-4)
  sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
    opt, factor=0.1, patience=2, threshold=1e-4
  )
  state = {"best": None, "bad": 0, "lr": 1e-4}
  for loss in losses:
    sched.step(loss)
    state = optim.plateau_update(state, loss, tc)
    assert state["lr"] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
  assert state["lr"] < 1e-4  # The sequence did trigger reductions.
  es = {"best": None, "wait": 0}
  waits = []
  for loss in [3.0, 2.0, 2.0, 2.5, 1.0]:
    es = optim.early_stop_update(es, loss)
    waits.append(es.pop("improved"))
  assert waits == [True, True, False, False, True]


class NanOnSecondRead:
  """A real store whose `trailer_id` comes back with a NaN feature from its
  second read on (its epoch-2 batch): what a NaN that slipped past the
  store's own checks does to training."""

  def __init__(self, store, trailer_id):
    self.store, self.trailer_id, self.reads = store, trailer_id, 0
    self.num_features = store.num_features

  def read(self, trailer_id, mmap=False):
    x = self.store.read(trailer_id, mmap=mmap)
    if trailer_id == self.trailer_id:
      self.reads += 1
      if self.reads >= 2:
        x = np.array(x)
        x[0, 0] = np.nan
    return x


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
  """Separable reps: per-clip features = labels @ genre means + noise."""
  root = str(tmp_path_factory.mktemp("reps"))
  rng = np.random.default_rng(0)
  n, dims = 96, {"image": 12, "video": 8}
  ids = [f"tt{i:05d}" for i in range(n)]
  labels = (rng.random((n, 10)) < 0.3).astype(np.float32)
  readers = {b: stores.NpyStore(root, b) for b in dims}
  clips = rng.integers(3, 12, size=n)
  for b, d in dims.items():
    means = rng.normal(size=(10, d))
    for i, tid in enumerate(ids):
      noise = rng.normal(size=(clips[i], d))
      readers[b].write(tid, labels[i] @ means + noise)
  split = np.tile(
    (np.arange(n) % 6 // 4 + (np.arange(n) % 6 == 5))[:, None], (1, 3)
  )  # 4/6 train, 1/6 validation, 1/6 test.
  config = divita_config.get_config()
  config.model.cam = "tsfm_32_4_2_0.1"
  config.train.num_clips = 6
  config.train.batch_size = 16
  config.train.eval_batch_size = 16
  config.train.learning_rate = 3e-3
  config.train.max_epochs = 8
  config.train.log_every_steps = 5
  return config, readers, ids, labels, split


def _fold(ids, labels, split):
  return common.FoldData.from_split(ids, labels, split, 1)


def test_train_fold_learns_resumes_exactly_and_falls_back(
  problem, tmp_path, caplog
):
  """One test, so the costly uninterrupted run is shared without relying on
  xdist placing tests on one worker."""
  config, stores, ids, labels, split = problem
  whole_dir = str(tmp_path / "whole")
  whole = loop.train_fold(config, whole_dir, stores, _fold(ids, labels, split))
  _check_learning(config, labels, split, whole)
  _check_sigterm_resume(problem, str(tmp_path / "fold"), whole, whole_dir)
  _check_truncated_fallback(config, whole_dir, str(tmp_path / "copy"), caplog)
  _check_other_config(problem, whole_dir, str(tmp_path / "other"))


def _files(root):
  """{relative path: size} of every file under root."""
  return {
    os.path.relpath(os.path.join(d, n), root): os.path.getsize(
      os.path.join(d, n)
    )
    for d, _, names in os.walk(root)
    for n in names
  }


def _check_other_config(problem, whole_dir, fold_dir):
  config, stores, ids, labels, split = problem
  shutil.copytree(whole_dir, fold_dir)
  before = _files(fold_dir)
  other = ml_collections.ConfigDict(config.to_dict())
  other.model.cam = "tsfm_16_4_2_0.1"  # Another head: other shapes.
  with pytest.raises(checkpoints.ConfigMismatch, match="different config"):
    loop.train_fold(other, fold_dir, stores, _fold(ids, labels, split))
  assert _files(fold_dir) == before  # Nothing deleted, nothing written.
  # A reading command on a damaged best checkpoint changes nothing either.
  best = os.path.join(fold_dir, "best")
  for d, _, names in os.walk(best):
    for n in names:
      with open(os.path.join(d, n), "r+b") as f:
        f.truncate(os.path.getsize(f.name) // 3)
  before = _files(fold_dir)
  with pytest.raises(ValueError, match="unreadable"):
    checkpoints.load_best(
      fold_dir, lambda nf: frozen.abstract_variables(config, nf)
    )
  assert _files(fold_dir) == before


def _check_learning(config, labels, split, whole):
  train_rows = split[:, 1] == 0
  test_labels = labels[split[:, 1] == 2]
  # Label-frequency baseline: every trailer gets the training frequencies.
  freq = np.broadcast_to(labels[train_rows].mean(0), test_labels.shape)
  baseline = metrics.compute_metrics(freq, test_labels)
  # Genres are a linear function of clip means at SNR ~3 (a linear probe
  # reaches muAP > 0.9); 0.2 over the baseline (~0.35) is far above seed
  # noise and far below what the head reaches.
  assert whole["test"]["uap"] > baseline["uap"] + 0.2
  assert whole["test"]["map"] > baseline["map"] + 0.2
  assert whole["test_probs"].shape == (16, 10)
  assert whole["val_ids"] == [f"tt{i:05d}" for i in range(96) if i % 6 == 4]
  assert 1 <= whole["epoch"] <= config.train.max_epochs


def _check_sigterm_resume(problem, workdir, whole, whole_dir):
  config, stores, ids, labels, split = problem
  # Validation windows are listed at setup (16 reads); each epoch reads
  # 4 batches x 16 trailers: read 100 lands in epoch 2. The interrupted run
  # reads per batch, the resumed one preloaded: batches are identical.
  faulty = dict(stores, image=SigtermAfter(stores["image"], after=100))
  with pytest.raises(checkpoints.Preempted) as stop:
    loop.train_fold(
      config, workdir, faulty, _fold(ids, labels, split), preload=False
    )
  latest, _ = checkpoints.managers(workdir)
  stopped_at = latest.latest_step()
  assert stop.value.step == stopped_at
  assert 0 < stopped_at < 4 * config.train.max_epochs
  resumed = loop.train_fold(config, workdir, stores, _fold(ids, labels, split))
  assert resumed["epoch"] == whole["epoch"]
  for key in ("val_probs", "test_probs"):
    np.testing.assert_array_equal(resumed[key], whole[key])
  assert resumed["test"] == whole["test"]
  # Best variables and the whole final train state are bitwise equal.
  for x, y in zip(_final(config, workdir), _final(config, whole_dir)):
    np.testing.assert_array_equal(x, y)


def _final(config, fold_dir):
  """Leaves of the best variables and of the latest train state."""
  best, _ = checkpoints.load_best(
    fold_dir, lambda nf: frozen.abstract_variables(config, nf)
  )
  mesh = sharding.make_mesh(config.mesh)
  abstract = frozen.programs(config, mesh, {"image": 12, "video": 8}).abstract
  latest, _ = checkpoints.managers(fold_dir)
  state, host = checkpoints.restore(latest, "state", abstract)
  assert host["done"]
  return [np.asarray(x) for x in jax.tree.leaves((best, state))]


def _check_truncated_fallback(config, whole_dir, fold_dir, caplog):
  shutil.copytree(whole_dir, fold_dir)
  latest, _ = checkpoints.managers(fold_dir)
  newest, previous = sorted(latest.all_steps(), reverse=True)
  for dirpath, _, files in os.walk(os.path.join(latest.directory, str(newest))):
    for name in files:  # What a full disk leaves: files cut short.
      with open(os.path.join(dirpath, name), "r+b") as f:
        f.truncate(max(os.path.getsize(f.name) // 3, 0))
  mesh = sharding.make_mesh(config.mesh)
  abstract = frozen.programs(config, mesh, {"image": 12, "video": 8}).abstract
  state, host = checkpoints.restore(latest, "state", abstract)
  assert int(state.step) == previous
  assert host["epochs_done"] == previous // 4
  assert "unreadable" in caplog.text
  assert latest.all_steps() == [previous]  # The broken one is set aside,
  (moved,) = os.listdir(os.path.join(fold_dir, "damaged"))  # not deleted.
  assert moved.startswith(f"checkpoints-{newest}-")


def test_non_finite_loss_stops_naming_its_step_checkpoints_intact(
  problem, tmp_path
):
  config, stores, ids, labels, split = problem
  faulty = dict(stores, image=NanOnSecondRead(stores["image"], ids[0]))
  fold_dir = str(tmp_path / "nan")
  with pytest.raises(loop.NonFiniteLoss, match=r"loss is nan at step \d+"):
    loop.train_fold(
      config, fold_dir, faulty, _fold(ids, labels, split), preload=False
    )
  latest, best = checkpoints.managers(fold_dir)
  assert latest.all_steps() == [4]  # Epoch 1's (4 steps an epoch) ...
  assert best.all_steps() == [1]
  mesh = sharding.make_mesh(config.mesh)
  abstract = frozen.programs(config, mesh, {"image": 12, "video": 8}).abstract
  state, host = checkpoints.restore(latest, "state", abstract)
  assert host["epochs_done"] == 1  # ... intact and finite.
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
