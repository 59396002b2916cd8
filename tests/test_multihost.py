"""Two JAX processes (gloo on 127.0.0.1) train exactly like one process."""

import collections
import ctypes
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from divita_jax.pipelines import stores
from tests import kill_at

pytestmark = pytest.mark.xdist_group("multihost")

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")
DATA_WORKER = os.path.join(
  os.path.dirname(__file__), "multihost_data_worker.py"
)


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
    store = stores.NpyStore(root, b)
    for i, tid in enumerate(ids):
      store.write(tid, labels[i] @ means + rng.normal(size=(clips[i], d)))
  split = np.tile(
    (np.arange(n) % 5 // 3 + (np.arange(n) % 5 == 4))[:, None], (1, 3)
  )
  np.savez(
    os.path.join(root, "problem.npz"), ids=ids, labels=labels, split=split
  )


def _launch(store, workdir, out, num_processes, devices, env=None):
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
      env={**os.environ, **(env or {})},
    )
    for p in range(num_processes)
  ]


def _wait(procs):
  for p in procs:
    output, _ = p.communicate(timeout=600)
    assert p.returncode == 0, output[-4000:]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """Store of the problem and the params of an uninterrupted 1-process run."""
  root = tmp_path_factory.mktemp("multihost")
  store = str(root / "store")
  _write_problem(store)
  _wait(_launch(store, str(root / "single"), str(root / "1.npz"), 1, 4))
  return store, np.load(root / "1.npz")


def test_two_processes_equal_one(uninterrupted, tmp_path):
  store, one = uninterrupted
  start = time.time()
  _wait(_launch(store, str(tmp_path / "multi"), str(tmp_path / "2.npz"), 2, 2))
  print(f"two-process run wall time: {time.time() - start:.1f}s")
  two = np.load(tmp_path / "2.npz")
  assert sorted(one.files) == sorted(two.files)
  assert len(one.files) > 10  # Every head parameter, not just the metrics.
  for key in one.files:
    np.testing.assert_allclose(one[key], two[key], atol=1e-5, err_msg=key)


def test_interleaved_mesh_equals_one_process(uninterrupted, tmp_path):
  # TPU slices interleave processes along the data axis: eval rows come
  # back as [0, 1, 4, 5, 2, 3, 6, 7]; probabilities must still land on
  # their trailers.
  store, _ = uninterrupted
  env = {"DIVITA_TEST_INTERLEAVE": "1"}
  _wait(_launch(store, str(tmp_path / "a"), str(tmp_path / "1.npz"), 1, 4, env))
  _wait(_launch(store, str(tmp_path / "b"), str(tmp_path / "2.npz"), 2, 2, env))
  one, two = np.load(tmp_path / "1.npz"), np.load(tmp_path / "2.npz")
  for key in one.files:
    np.testing.assert_allclose(one[key], two[key], atol=1e-5, err_msg=key)


def _first_checkpoint(workdir: str, proc, timeout: float = 600) -> None:
  ckpts = os.path.join(workdir, "checkpoints")
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(ckpts) and any(d.isdigit() for d in os.listdir(ckpts)):
      return
    time.sleep(0.05)
  raise AssertionError("No checkpoint appeared before the run ended.")


def test_kill_9_then_restart_equals_uninterrupted(uninterrupted, tmp_path):
  store, one = uninterrupted
  workdir, out = str(tmp_path / "killed"), str(tmp_path / "k.npz")
  (proc,) = _launch(store, workdir, out, 1, 4, {"DIVITA_TEST_LOG_STEPS": "1"})
  kill_at.kill_at_step(proc, seed=1)  # A seeded step of epoch 2.
  assert not os.path.exists(out), "The run finished before it was killed."
  _wait(_launch(store, workdir, out, 1, 4))  # Restart in the same workdir.
  resumed = np.load(out)
  assert sorted(one.files) == sorted(resumed.files)
  for key in one.files:  # Bitwise: same device layout, same order of ops.
    np.testing.assert_array_equal(one[key], resumed[key], err_msg=key)


def _no_bigger_files_than(num_bytes: int):
  """preexec_fn: a full disk, as the process sees it (writes fail EFBIG)."""

  def limit():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (num_bytes, num_bytes))

  return limit


def _preempted(store, workdir, out, sig=signal.SIGTERM) -> list[str]:
  """Runs until the first checkpoint, signals; returns the checkpoints."""
  (proc,) = _launch(store, workdir, out, 1, 4)
  _first_checkpoint(workdir, proc)
  proc.send_signal(sig)  # Preempted or Ctrl-C: checkpoint, then exit.
  output, _ = proc.communicate()
  assert proc.returncode == 128 + sig, output[-3000:]
  assert "Traceback" not in output, output[-3000:]
  steps = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  assert all(s.isdigit() for s in steps), steps  # No temporary leftovers.
  return steps


def _resume_failing(store, workdir, out, preexec_fn):
  """Resumes in a process set up by preexec_fn; returns its stderr."""
  port = str(_free_port())
  failed = subprocess.run(
    [sys.executable, WORKER, store, workdir, out, "1", "0", port, "4"],
    capture_output=True,
    text=True,
    timeout=600,
    preexec_fn=preexec_fn,
  )
  assert failed.returncode != 0
  assert "Could not write checkpoint" in failed.stderr, failed.stderr[-3000:]
  return failed.stderr


def _resume_equals(one, store, workdir, out):
  _wait(_launch(store, workdir, out, 1, 4))
  resumed = np.load(out)
  for key in one.files:
    np.testing.assert_array_equal(one[key], resumed[key], err_msg=key)


def _without_root_file_powers():
  """preexec_fn: permission bits apply even to root (drops CAP_DAC_*).

  As root, chmod alone does not make a folder unwritable: root has
  CAP_DAC_OVERRIDE. Dropping it (and DAC_READ_SEARCH, FOWNER) from the
  child's bounding set, so the exec'd program cannot regain them, makes
  the kernel check the mode bits as it does for everyone else. Not root:
  nothing to drop.
  """

  def drop():
    if os.geteuid() != 0:
      return
    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop = 24
    for cap in (1, 2, 3):  # DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER
      if libc.prctl(pr_capbset_drop, cap, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")

  return drop


def test_full_disk_or_unwritable_workdir_is_a_clear_error_keeping_checkpoints(
  uninterrupted, tmp_path
):
  """Ctrl-C, then a resume on a full disk, then one in a read-only
  checkpoint folder: each fails naming the reason and the path, neither
  loses a checkpoint, and the resume with space and rights back equals
  the uninterrupted run."""
  store, one = uninterrupted
  workdir, out = str(tmp_path / "run"), str(tmp_path / "r.npz")
  ckpts = os.path.join(workdir, "checkpoints")
  steps = _preempted(store, workdir, out, signal.SIGINT)  # Ctrl-C.
  stderr = _resume_failing(store, workdir, out, _no_bigger_files_than(3000))
  assert "File too large" in stderr and workdir in stderr
  assert sorted(os.listdir(ckpts)) == steps
  os.chmod(ckpts, 0o555)  # Read-only from here on.
  try:
    stderr = _resume_failing(store, workdir, out, _without_root_file_powers())
  finally:
    os.chmod(ckpts, 0o755)
  assert "Permission denied" in stderr and ckpts in stderr
  assert sorted(os.listdir(ckpts)) == steps
  _resume_equals(one, store, workdir, out)


def test_two_processes_build_once_and_split_extraction(tmp_path):
  workdir, port = str(tmp_path / "run"), str(_free_port())
  outs = [str(tmp_path / f"p{p}.json") for p in range(2)]
  start = time.time()
  _wait(
    [
      subprocess.Popen(
        [sys.executable, DATA_WORKER, workdir, outs[p], "2", str(p), port],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )
      for p in range(2)
    ]
  )
  print(f"two-process build + extraction: {time.time() - start:.1f}s")
  a, b = (json.load(open(o)) for o in outs)
  ids = a["ids"]
  assert ids == b["ids"] and len(ids) == 8
  # Build: process 0 prepares every trailer once, the other waits.
  assert sorted(a["saved"]) == sorted(ids) and b["saved"] == []
  assert not a["beam_imported"] and not b["beam_imported"]  # Local build.
  # Extraction: each trailer's file of each branch written exactly once.
  assert set(a["written"]).isdisjoint(b["written"])
  written = collections.Counter(a["written"] + b["written"])
  assert written == {i: len(a["branches"]) for i in ids}
  assert all(a["complete"]) and all(b["complete"])
