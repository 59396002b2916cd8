"""The head's speed levers keep the numerics: several steps per dispatch
(a lax.scan over stacked batches) equal single steps bit for bit, in a step
and over a whole fold with a preemption and a resume in the middle."""

import jax
import numpy as np
import pytest

from divita_jax import hosts, sharding
from divita_jax.configs import divita as divita_config
from divita_jax.pipelines import common, stores
from divita_jax.trainers import checkpoints, frozen, loop
from divita_jax.trainers import state as st
from tests.conftest import SigtermAfter

DIMS = {"image": 12, "video": 8}


def _config():
  config = divita_config.get_config()
  config.model.cam = "tsfm_32_4_2_0.1"
  config.train.num_clips = 6
  config.train.batch_size = 8
  config.train.eval_batch_size = 8
  config.train.learning_rate = 3e-3
  config.train.max_epochs = 3
  config.train.log_every_steps = 2
  return config


def _batch(rng, config):
  b, s = config.train.batch_size, config.train.num_clips
  out = {
    k: rng.normal(size=(b, s, d)).astype(np.float32) for k, d in DIMS.items()
  }
  out["mask"] = np.arange(s)[None] < rng.integers(1, s + 1, size=(b, 1))
  out["labels"] = (rng.random((b, 10)) < 0.3).astype(np.float32)
  return out


def test_scanned_steps_equal_single_steps_bitwise():
  config = _config()
  mesh = sharding.make_mesh(config.mesh)
  p = frozen.programs(config, mesh, DIMS)
  rng = np.random.default_rng(0)
  batches = [_batch(rng, config) for _ in range(3)]
  lrs = np.array([3e-3, 1e-3, 3e-4], np.float32)  # Per step, as finetune's.
  single = p.init(jax.random.PRNGKey(0))
  losses = []
  for batch, lr in zip(batches, lrs):
    single, m = p.train_step(single, hosts.global_batch(batch, mesh), lr)
    losses.append(float(m["loss"]))
  scanned, metrics = p.train_steps(
    p.init(jax.random.PRNGKey(0)), st.global_batches(batches, mesh), lrs
  )
  assert metrics["loss"].shape == (3,)
  np.testing.assert_array_equal(np.asarray(metrics["loss"]), losses)
  for x, y in zip(jax.tree.leaves(single), jax.tree.leaves(scanned)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
  """48 trailers of learnable reps; 32 train (4 steps), 8 val, 8 test."""
  root = str(tmp_path_factory.mktemp("reps"))
  rng = np.random.default_rng(0)
  n = 48
  ids = [f"tt{i:05d}" for i in range(n)]
  labels = (rng.random((n, 10)) < 0.3).astype(np.float32)
  readers = {b: stores.NpyStore(root, b) for b in DIMS}
  clips = rng.integers(3, 12, size=n)
  for b, d in DIMS.items():
    means = rng.normal(size=(10, d))
    for i, tid in enumerate(ids):
      readers[b].write(tid, labels[i] @ means + rng.normal(size=(clips[i], d)))
  split = np.tile(
    (np.arange(n) % 6 // 4 + (np.arange(n) % 6 == 5))[:, None], (1, 3)
  )
  return readers, common.FoldData.from_split(ids, labels, split, 1)


def _leaves(config, fold_dir):
  """Leaves of the latest (final) train state of a fold."""
  mesh = sharding.make_mesh(config.mesh)
  abstract = frozen.programs(config, mesh, DIMS).abstract
  latest, _ = checkpoints.managers(fold_dir)
  state, host = checkpoints.restore(latest, "state", abstract)
  assert host["done"]
  return [np.asarray(x) for x in jax.tree.leaves(state)], host


def test_fold_results_do_not_depend_on_steps_per_dispatch(problem, tmp_path):
  """4 steps an epoch: one scanned dispatch of 3 + one single step, and a
  SIGTERM mid-fold resumed: the same as one dispatch per step, bitwise."""
  readers, data = problem
  config = _config()
  runs = {}
  for k in (1, 3):
    fold_dir = str(tmp_path / f"k{k}")
    runs[k] = loop.train_fold(
      config, fold_dir, readers, data, steps_per_dispatch=k
    )
    runs[k]["final"] = _leaves(config, fold_dir)
  # Validation is listed at setup (8 reads); each epoch reads 4 batches of
  # 8 trailers: read 50 lands in epoch 2.
  fold_dir = str(tmp_path / "preempted")
  faulty = dict(readers, image=SigtermAfter(readers["image"], after=50))
  with pytest.raises(checkpoints.Preempted) as stop:
    loop.train_fold(
      config, fold_dir, faulty, data, preload=False, steps_per_dispatch=3
    )
  assert 0 < stop.value.step < 4 * config.train.max_epochs
  runs["resumed"] = loop.train_fold(
    config, fold_dir, readers, data, steps_per_dispatch=3
  )
  runs["resumed"]["final"] = _leaves(config, fold_dir)
  for other in (runs[3], runs["resumed"]):
    assert other["epoch"] == runs[1]["epoch"]
    np.testing.assert_equal(other["test"], runs[1]["test"])  # NaN: no positive.
    for key in ("val_probs", "test_probs"):
      np.testing.assert_array_equal(other[key], runs[1][key])
    leaves, host = other["final"]
    assert host == runs[1]["final"][1]  # Losses summed to the same floats.
    for x, y in zip(leaves, runs[1]["final"][0]):
      np.testing.assert_array_equal(x, y)


def test_steps_per_dispatch_below_one_is_refused(problem, tmp_path):
  readers, data = problem
  with pytest.raises(ValueError, match="steps_per_dispatch must be >= 1"):
    loop.train_fold(
      _config(), str(tmp_path), readers, data, steps_per_dispatch=0
    )


def test_stacks_read_ahead_only_what_is_asked_and_keep_the_state():
  calls = []

  def read(first, n):  # Step i's batch holds i.
    calls.append((first, n))
    return {"x": np.arange(first, first + n)[:, None]}

  it = loop.Stacks(read, {"next_index": 3})
  plan = ((8, 8), (8, 1), (1, 2), (3, 0))  # (n, the next read ahead)
  got = [loop.next_batches(it, n, then) for n, then in plan]
  np.testing.assert_array_equal(got[0]["x"][:, 0], np.arange(3, 11))
  np.testing.assert_array_equal(got[1]["x"][:, 0], np.arange(11, 19))
  np.testing.assert_array_equal(got[2]["x"], [19])  # One step: unstacked.
  np.testing.assert_array_equal(got[3]["x"][:, 0], np.arange(20, 23))
  assert it.get_state() == {"next_index": 23}
  # The read ahead is used once; a wrong guess (2 steps) is read again.
  assert calls.count((11, 8)) == 1 and calls.count((20, 3)) == 1
