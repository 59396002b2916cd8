"""Test setup: 8 fake CPU devices for sharding tests, CPU-only JAX, and
one persistent compilation cache for the whole test run."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

from divita_jax.references.torchvision_cpu import torchvision

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TFDS_DISABLE_GCS", "1")

# Many tests (and the subprocesses they start: runs, kills, resumes, the
# multi-host workers) compile the same programs again; one cache shared by
# the xdist workers and their children compiles each once per test run.
# The same executable either way, so results are unchanged. Removed when
# the run ends.
# The xdist controller loads this file before it starts the workers, which
# inherit its environment.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
    prefix="divita_jax_test_jit_cache_"
  )
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

# transformers imports torchvision when it is installed: declare its C-op
# schemas before any test module imports either.
torchvision()

# The tiny end-to-end run shared by the pipeline, predict and notebook tests.
# Tests using it carry `@pytest.mark.xdist_group("pipeline")` so that, under
# `pytest -n 2 --dist loadgroup`, they share one worker and one run.
TINY_RUN_FLAGS = (
  "--config=configs/divita.py:runlocal",
  "--config.dataset.num_trailers=48",
  # A non-default dataset setting: the notebook must build what the run did.
  "--config.dataset.max_flash_len=3",
  "--config.train.max_epochs=12",
  # Ten times the paper's rate: 12 epochs of 1-2 steps must suffice here.
  "--config.train.learning_rate=3e-3",
)


def run_main(*flags: str, timeout: float = 900) -> subprocess.CompletedProcess:
  """`python -m divita_jax.main FLAGS` from the repository root, stderr not
  a terminal (captured); fails the test with the end of its stderr unless
  it succeeds. Returns the finished process (stdout, stderr)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
    [sys.executable, "-m", "divita_jax.main", *flags],
    cwd=root,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  assert proc.returncode == 0, proc.stderr[-5000:]
  return proc


class SigtermAfter:
  """A real store that sends this process SIGTERM at its `after`-th read
  (fault injection: preemption in the middle of training)."""

  def __init__(self, store, after):
    self.store, self.after, self.reads = store, after, 0
    self.num_features = store.num_features

  def read(self, trailer_id, mmap=False):
    self.reads += 1
    if self.reads == self.after:
      os.kill(os.getpid(), signal.SIGTERM)
    return self.store.read(trailer_id, mmap=mmap)


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
  """Workdir of `python -m divita_jax.main` on a tiny synthetic config; its
  console (stdout, then stderr) in `<workdir>.console.txt`, next to it."""
  workdir = tmp_path_factory.mktemp("tiny_run")
  proc = run_main(*TINY_RUN_FLAGS, f"--workdir={workdir}")
  with open(f"{workdir}.console.txt", "w") as f:
    f.write(proc.stdout + proc.stderr)
  return str(workdir)


@pytest.fixture(scope="session")
def audio_workdir(trained_workdir, tmp_path_factory):
  """`audio_only` (a tiny random AST on per-clip log-mels) on the tiny run's
  dataset (read only)."""
  workdir = tmp_path_factory.mktemp("audio_run")
  flags = [f for f in TINY_RUN_FLAGS if not f.startswith("--config=")]
  data_dir = os.path.join(trained_workdir, "tfds")
  run_main(
    "--config=configs/divita.py:runlocal,audio_only",
    *flags,
    f"--config.dataset.data_dir={data_dir}",
    f"--workdir={workdir}",
  )
  return str(workdir)


def pytest_sessionfinish(session):
  if _OWN_CACHE and not hasattr(session.config, "workerinput"):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
