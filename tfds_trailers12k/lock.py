"""One build of a dataset config at a time: a lock file beside the data.

`<data_dir>/trailers12k/<config>/<version>.lock` holds the builder's pid,
host and start time. A second build of the same config into the same
data_dir waits for the first (it then finds the dataset ready); a lock
left by a dead process on this host is taken over. After `timeout`
seconds of waiting it stops with a message naming the holder.
"""

import contextlib
import json
import os
import socket
import time

from absl import logging


class LockTimeout(RuntimeError):
  """Another build held the lock for longer than we waited."""


def _holder(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}  # Being written or removed right now.


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _try_acquire(path: str) -> bool:
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
  with os.fdopen(fd, "w") as f:
    json.dump(me, f)
  return True


@contextlib.contextmanager
def build_lock(path: str, timeout: float = 24 * 3600, poll: float = 0.5):
  """Holds the lock file `path` for the duration of the block."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  start, told = time.time(), False
  while not _try_acquire(path):
    holder = _holder(path)
    same_host = holder.get("host") == socket.gethostname()
    if holder and same_host and not _alive(int(holder["pid"])):
      logging.warning("Taking over the lock of dead build %s: %s", holder, path)
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)  # Our own lock file, left by a dead build.
      continue
    if time.time() - start > timeout:
      raise LockTimeout(
        f"Another build of this dataset (pid {holder.get('pid')} on "
        f"{holder.get('host')}) has held {path} for over {timeout:.0f} s. "
        "Wait for it, or remove the lock file if that build is gone."
      )
    if not told:
      print(
        f"Waiting for another build of this dataset (pid "
        f"{holder.get('pid')} on {holder.get('host')}; lock {path}).",
        flush=True,
      )
      told = True
    time.sleep(poll)
  try:
    yield
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)
