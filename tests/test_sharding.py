"""Mesh construction and a sharded train step equal to the unsharded one."""

import jax
import ml_collections
import numpy as np
import pytest

from divita_jax import hosts, sharding
from divita_jax.configs import divita as divita_config
from divita_jax.trainers import frozen


def _mesh_config(shape, axes=("data", "model")):
  c = ml_collections.ConfigDict()
  c.shape, c.axes = shape, axes
  c.rules = divita_config.get_config().mesh.rules
  return c


def test_mesh_fills_minus_one_and_rejects_bad_shapes():
  assert sharding.mesh_shape((-1, 2), 8) == (4, 2)
  assert sharding.mesh_shape((2, 4), 8) == (2, 4)
  mesh = sharding.make_mesh(_mesh_config((-1, 4)))
  assert dict(mesh.shape) == {"data": 2, "model": 4}
  with pytest.raises(ValueError, match="does not divide"):
    sharding.mesh_shape((3, -1), 8)
  with pytest.raises(ValueError, match="at most one"):
    sharding.mesh_shape((-1, -1), 8)
  with pytest.raises(ValueError, match="uses 4 devices"):
    sharding.mesh_shape((2, 2), 8)
  with pytest.raises(ValueError, match="differ in length"):
    sharding.make_mesh(_mesh_config((8,)))


def _config(mesh_shape):
  c = divita_config.get_config()
  c.model.cam = "tsfm_16_4_2_0.25"
  c.train.num_clips = 5
  c.train.batch_size = 8
  c.train.learning_rate = 1e-3
  c.mesh.shape = mesh_shape
  return c


def _step(config, devices, batch):
  mesh = sharding.make_mesh(config.mesh, devices)
  p = frozen.programs(config, mesh, {"image": 6, "video": 4})
  state = p.init(jax.random.PRNGKey(config.seed))
  lr = np.float32(config.train.learning_rate)
  state, m1 = p.train_step(state, hosts.global_batch(batch, mesh), lr)
  state, m2 = p.train_step(state, hosts.global_batch(batch, mesh), lr)
  return state, np.array([m1["loss"], m2["loss"]]), p.shardings


def test_sharded_step_equals_single_device_step():
  rng = np.random.default_rng(0)
  batch = {
    "image": rng.normal(size=(8, 5, 6)).astype(np.float32),
    "video": rng.normal(size=(8, 5, 4)).astype(np.float32),
    "mask": np.arange(5)[None] < rng.integers(1, 6, size=(8, 1)),
    "labels": (rng.random((8, 10)) < 0.3).astype(np.float32),
  }
  single, loss1, _ = _step(_config((1, 1)), jax.devices()[:1], batch)
  sharded, loss8, shardings = _step(_config((2, 4)), jax.devices(), batch)
  # The 2x4 mesh really splits parameters along 'model'.
  specs = [s.spec for s in jax.tree.leaves(shardings.params)]
  assert any("model" in tuple(s) for s in specs)
  query = sharded.params["image"]["cam"]["block"]["attention"]["query"]
  assert query["kernel"].sharding.spec == jax.P(None, "model")
  assert query["kernel"].addressable_shards[0].data.shape == (16, 4)
  np.testing.assert_allclose(loss8, loss1, atol=1e-5, rtol=1e-5)
  flat1 = jax.tree.leaves_with_path(jax.device_get(single))
  flat8 = jax.tree.leaves(jax.device_get(sharded))
  for (path, a), b in zip(flat1, flat8):
    np.testing.assert_allclose(
      b, a, atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path)
    )
