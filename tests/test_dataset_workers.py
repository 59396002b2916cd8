"""Build workers: no dependence on the caller's main module; crashes of the
environment are not blamed on trailers; one build per config at a time."""

import multiprocessing.spawn
import os
import subprocess
import sys
import textwrap

import nbformat
import pytest
from nbclient import NotebookClient

from tests import worker_fns
from tfds_trailers12k import workers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two worker processes, so the build really spawns.
BUILD = textwrap.dedent(
  """
  import json, sys
  sys.path.insert(0, {root!r})
  import tfds_trailers12k
  builder = tfds_trailers12k.build(
    "synthetic", {data_dir!r}, num_trailers=3, num_workers=2
  )
  print("EXAMPLES", builder.info.splits.total_num_examples)
  print("SKIPPED", json.dumps(builder.info.metadata["skipped"]))
  print("BEAM", "apache_beam" in sys.modules)  # The local build needs none.
  """
)


def _script(data_dir) -> str:
  return BUILD.format(root=ROOT, data_dir=str(data_dir))


def _check(output: str):
  assert "EXAMPLES 3" in output, output[-3000:]
  assert "SKIPPED []" in output, output[-3000:]
  assert "BEAM False" in output, output[-3000:]


def test_unguarded_script_and_stdin_build(tmp_path):
  script = tmp_path / "build.py"  # No `if __name__ == "__main__":` guard.
  script.write_text(_script(tmp_path / "a"))
  run = dict(capture_output=True, text=True, timeout=600, cwd=tmp_path)
  out = subprocess.run([sys.executable, str(script)], **run)
  assert out.returncode == 0, out.stderr[-3000:]
  _check(out.stdout)
  assert out.stdout.count("EXAMPLES") == 1  # Workers did not re-run it.
  out = subprocess.run(
    [sys.executable, "-"], input=_script(tmp_path / "b"), **run
  )
  assert out.returncode == 0, out.stderr[-3000:]
  _check(out.stdout)


def test_notebook_build(tmp_path):
  nb = nbformat.v4.new_notebook()
  nb.cells = [nbformat.v4.new_code_cell(_script(tmp_path / "nb"))]
  NotebookClient(nb, timeout=600, kernel_name="python3").execute()
  _check("".join(o.get("text", "") for o in nb.cells[0].outputs))


def test_two_builds_at_once_wait_for_each_other(tmp_path):
  script = tmp_path / "build.py"
  script.write_text(_script(tmp_path / "shared"))
  procs = [
    subprocess.Popen(
      [sys.executable, str(script)],
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      cwd=tmp_path,
    )
    for _ in range(2)
  ]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    _check(out)
  assert any("Waiting for another build" in o for o in outputs)


def test_a_worker_death_is_retried_in_a_fresh_worker(tmp_path):
  items = [(str(tmp_path / f"m{i}"), i) for i in range(3)]
  crashed = lambda item, detail: ("crashed", item[1])
  got = list(workers.map_in_pool(worker_fns.crash_once, items, 2, "t", crashed))
  assert got == [0, 1, 2]  # Died once each, then ran: not the files' fault.
  got = list(
    workers.map_in_pool(worker_fns.always_crash, items, 2, "t", crashed)
  )
  assert got == [("crashed", 0), ("crashed", 1), ("crashed", 2)]


def test_an_isolated_worker_outlives_calls_and_crashes(tmp_path):
  worker = workers.IsolatedWorker()
  crashed = lambda item, detail: ("crashed", item[1])
  try:
    assert worker.run(abs, -2, crashed) == 2
    first = worker._pool
    # Kills its child once: run again in a fresh one, not the file's fault.
    item = (str(tmp_path / "m"), 7)
    assert worker.run(worker_fns.crash_once, item, crashed) == 7
    assert worker.run(worker_fns.always_crash, item, crashed) == (
      "crashed",
      7,
    )
    assert worker.run(abs, -3, crashed) == 3 and worker._pool is not first
  finally:
    worker.close()


def test_workers_that_cannot_start_are_an_error_not_skips(monkeypatch):
  monkeypatch.setattr(multiprocessing.spawn, "_python_exe", b"/bin/false")
  crashed = lambda item, detail: pytest.fail("blamed a file")
  with pytest.raises(workers.WorkerStartError, match="cannot start"):
    list(workers.map_in_pool(abs, [-1, -2, -3], 2, "t", crashed))
