"""Two JAX processes (gloo on 127.0.0.1) train exactly like one process."""

import os
import socket
import subprocess
import sys
import time

import numpy as np

from divita_jax import reps

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _write_problem(root: str) -> None:
  rng = np.random.default_rng(0)
  n, d = 40, 12
  labels = (rng.uniform(size=(n, 10)) < 0.3).astype(np.int32)
  means = rng.normal(size=(10, d))
  ids = [f"tt{i:04d}" for i in range(n)]
  clips = rng.integers(3, 15, size=n)  # Both branches: one clip per shot.
  for b in ("image", "video"):
    store = reps.NpyStore(root, b)
    for i, tid in enumerate(ids):
      store.write(tid, labels[i] @ means + rng.normal(size=(clips[i], d)))
  split = np.tile(
    (np.arange(n) % 5 // 3 + (np.arange(n) % 5 == 4))[:, None], (1, 3)
  )
  np.savez(
    os.path.join(root, "problem.npz"), ids=ids, labels=labels, split=split
  )


def _launch(store, workdir, out, num_processes, devices):
  port = _free_port()
  return [
    subprocess.Popen(
      [
        sys.executable,
        WORKER,
        store,
        workdir,
        out,
        str(num_processes),
        str(p),
        str(port),
        str(devices),
      ],
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for p in range(num_processes)
  ]


def _wait(procs):
  for p in procs:
    output, _ = p.communicate(timeout=600)
    assert p.returncode == 0, output[-4000:]


def test_two_processes_equal_one(tmp_path):
  store = str(tmp_path / "store")
  _write_problem(store)
  start = time.time()
  # Both runs at once: 1 process x 4 devices and 2 processes x 2 devices.
  single = _launch(
    store, str(tmp_path / "single"), str(tmp_path / "1.npz"), 1, 4
  )
  multi = _launch(store, str(tmp_path / "multi"), str(tmp_path / "2.npz"), 2, 2)
  _wait(single + multi)
  print(f"two-process test wall time: {time.time() - start:.1f}s")
  one, two = np.load(tmp_path / "1.npz"), np.load(tmp_path / "2.npz")
  assert sorted(one.files) == sorted(two.files)
  assert len(one.files) > 10  # Every head parameter, not just the metrics.
  for key in one.files:
    np.testing.assert_allclose(one[key], two[key], atol=1e-5, err_msg=key)
