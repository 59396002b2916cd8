"""Worker processes of a build: an ordered map that survives crashes.

Workers are started with `spawn` (the caller may be a multithreaded JAX or
TF process, where fork is unsafe). A spawned worker normally re-imports
the caller's main module; that breaks a build called from a script without
an `if __name__ == "__main__":` guard (every worker starts a build of its
own), from stdin or from a notebook. The functions we run live in modules
of this package, so the workers do not need the main module at all: it is
hidden while they start (`_submit`).

Failures: a worker that dies is not blamed on its file at once. Its items
are re-run one per fresh worker; a file that kills two fresh workers in a
row is the file's failure (`crashed(item, detail)`). When not even a
trivial task runs in a fresh worker, the environment is broken:
`WorkerStartError`, and nothing is recorded against any file.

`IsolatedWorker` applies the same rule one item at a time, in one
long-lived child process: the Beam build's steps run in it, so a decoder
crash takes down the child, never the runner's worker.
"""

import collections
import concurrent.futures
import contextlib
import multiprocessing
import sys

import tensorflow_datasets as tfds

# Two fresh worker processes died on the file in a row (a decoder crash on
# a corrupt or hostile file); environment failures never get here.
CRASHED = "the file killed its worker process twice (decoder crash)"


class WorkerStartError(RuntimeError):
  """Worker processes cannot start or run here (not a bad trailer)."""


@contextlib.contextmanager
def _main_module_hidden():
  """Spawned workers skip importing `__main__` while this is active."""
  main = sys.modules["__main__"]
  saved = {
    k: getattr(main, k) for k in ("__file__", "__spec__") if hasattr(main, k)
  }
  try:
    main.__spec__ = None
    if hasattr(main, "__file__"):
      del main.__file__
    yield
  finally:
    for k, v in saved.items():
      setattr(main, k, v)


def _pool(workers: int):
  ctx = multiprocessing.get_context("spawn")
  return concurrent.futures.ProcessPoolExecutor(workers, ctx)


def _submit(pool, fn, item):
  # Spawn-context pools start their processes inside submit().
  with _main_module_hidden():
    try:
      return pool.submit(fn, item)
    except OSError as e:  # The process could not start.
      raise concurrent.futures.process.BrokenProcessPool(
        f"worker start failed: {e}"
      ) from e


def _isolated(fn, item):
  """(True, fn(item)) in a fresh one-worker pool; (False, why) if it died."""
  with _pool(1) as pool:
    try:
      return True, _submit(pool, fn, item).result()
    except concurrent.futures.process.BrokenProcessPool as e:
      return False, str(e) or type(e).__name__


def check_workers_start() -> None:
  """Raises WorkerStartError if a fresh worker cannot run a trivial task."""
  ok, why = _isolated(abs, -1)
  if not ok:
    raise WorkerStartError(
      f"Worker processes cannot start or run here ({why}); nothing was "
      "recorded against any trailer. Fix the environment (memory, process "
      "limits) or build with num_workers=1."
    )


def _retry(fn, pending, crashed):
  """Items in flight when a worker died: each again in a fresh worker."""
  check_workers_start()
  for item, future in pending:
    if future.done() and not future.cancelled() and future.exception() is None:
      yield future.result()  # Finished before the crash.
      continue
    # The pool's death may not have been this item's (it may not even have
    # started): two deaths in a row of fresh workers on it are its own.
    ok, result = _isolated(fn, item)
    if not ok:
      ok, result = _isolated(fn, item)
    if not ok:
      check_workers_start()
      result = crashed(item, result)
    yield result


def map_in_pool(fn, items: list, num_workers: int, desc: str, crashed):
  """Ordered map of `fn` over worker processes, with a trailers/s bar.

  `crashed(item, detail)` is the result for an item that killed two fresh
  workers in a row. num_workers 0 = all cores; 1 = in process. Every item
  comes back exactly once, in order (a result or `crashed`), whenever a
  worker dies: an item is always in `todo` or `pending`.
  """
  workers = num_workers or multiprocessing.cpu_count()
  workers = max(1, min(workers, len(items)))
  bar = tfds.core.utils.tqdm(total=len(items), desc=desc, unit=" trailers")
  if workers == 1:
    for item in items:
      yield fn(item)
      bar.update(1)
    bar.close()
    return
  todo = collections.deque(items)
  while todo:
    # A bounded window of futures, so finished videos waiting behind a
    # slow one do not pile up in memory.
    pending = collections.deque()
    with _pool(workers) as pool:
      try:
        while todo or pending:
          while todo and len(pending) < 2 * workers:
            # Taken from `todo` only once submitted: a pool that broke
            # meanwhile raises here with the item still in `todo`.
            future = _submit(pool, fn, todo[0])
            pending.append((todo.popleft(), future))
          result = pending[0][1].result()
          pending.popleft()
          yield result
          bar.update(1)
      except concurrent.futures.process.BrokenProcessPool:
        pass
    for result in _retry(fn, pending, crashed):
      yield result
      bar.update(1)
  bar.close()


class IsolatedWorker:
  """Runs `fn(item)` in a child process that outlives calls.

  A child that dies is replaced; an item that kills two fresh children in
  a row gets `crashed(item, detail)`, as in `map_in_pool`.
  """

  def __init__(self):
    self._pool = None

  def _run(self, fn, item):
    if self._pool is None:
      self._pool = _pool(1)
    try:
      return True, _submit(self._pool, fn, item).result()
    except concurrent.futures.process.BrokenProcessPool as e:
      self.close()
      return False, str(e) or type(e).__name__

  def run(self, fn, item, crashed):
    deaths = 0  # Of fresh children: one that ran other items may be theirs.
    while True:
      fresh = self._pool is None
      ok, result = self._run(fn, item)
      if ok:
        return result
      deaths += fresh
      check_workers_start()
      if deaths == 2:
        return crashed(item, result)

  def close(self):
    if self._pool is not None:
      self._pool.shutdown(cancel_futures=True)
      self._pool = None
