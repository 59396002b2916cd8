"""One JAX process of the multi-host test: trains a tiny head, dumps params.

  python tests/multihost_worker.py STORE WORKDIR OUT.npz NUM_PROCESSES \
    PROCESS_ID PORT DEVICES_PER_PROCESS [MAX_EPOCHS (6)]
"""

import os
import sys

import multihost_common

store, workdir, out, num_processes, process_id, port, devices = sys.argv[1:8]
max_epochs = int(sys.argv[8]) if len(sys.argv) > 8 else 6
jax = multihost_common.start(
  int(num_processes), int(process_id), port, int(devices)
)

import numpy as np  # noqa: E402
from absl import logging  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from divita_jax import sharding  # noqa: E402
from divita_jax.configs import divita  # noqa: E402
from divita_jax.pipelines import common, stores  # noqa: E402
from divita_jax.trainers import checkpoints, frozen, loop  # noqa: E402

INTERLEAVE = os.environ.get("DIVITA_TEST_INTERLEAVE") == "1"


def _interleaved_mesh(mesh_config, devices=None):
  """Processes alternate along the data axis, as create_device_mesh lays
  out a TPU slice (v4-32: 0,1,2,3,0,1,2,3,...)."""
  by_process = [
    [d for d in jax.devices() if d.process_index == p]
    for p in range(jax.process_count())
  ]
  order = [d for column in zip(*by_process) for d in column]
  return _make_mesh(mesh_config, order)


_make_mesh = sharding.make_mesh
if INTERLEAVE:  # Every module reads sharding.make_mesh at call time.
  sharding.make_mesh = _interleaved_mesh


def main():
  problem = np.load(os.path.join(store, "problem.npz"))
  ids = [str(i) for i in problem["ids"]]
  readers = {b: stores.NpyStore(store, b) for b in ("image", "video")}
  config = divita.get_config()
  config.model.cam = "tsfm_16_4_2_0.1"
  config.mesh.shape = (-1, 2)  # 2 x 2 over 4 devices, whatever the hosts.
  if INTERLEAVE:
    config.mesh.shape = (-1, 1)  # 4 data rows: processes 0,1,0,1.
    # Dropout masks follow global row positions, which the interleaving
    # permutes: without dropout only the row order differs.
    config.model.cam = "tsfm_16_4_2_0.0"
  config.train.num_clips = 6
  config.train.batch_size = 8
  config.train.eval_batch_size = 8
  config.train.learning_rate = 3e-3
  config.train.max_epochs = max_epochs
  if os.environ.get("DIVITA_TEST_LOG_STEPS") == "1":  # Kill tests wait on
    config.train.log_every_steps = 1  # its "Step k:" lines (stdout is read
    logging.set_verbosity(logging.INFO)  # as it comes, so nothing blocks).
  data = common.FoldData.from_split(ids, problem["labels"], problem["split"], 0)
  try:
    result = loop.train_fold(config, workdir, readers, data)
  except checkpoints.Preempted as e:
    sys.exit(128 + e.signum)  # What main.py does.
  variables, _ = checkpoints.load_best(
    workdir, lambda nf: frozen.abstract_variables(config, nf)
  )
  params = multihost_utils.process_allgather(variables["params"], tiled=True)
  flat = {
    jax.tree_util.keystr(k): np.asarray(v)
    for k, v in jax.tree_util.tree_leaves_with_path(params)
  }
  if jax.process_index() == 0:
    np.savez(
      out, test_probs=result["test_probs"], uap=result["test"]["uap"], **flat
    )


main()
