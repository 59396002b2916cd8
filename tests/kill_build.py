"""Kill a dataset build once it has saved some trailers (no sleeps as
timing): the build runs in a child process of its own session, its
prepared folder is watched, and the whole session gets SIGKILL."""

import os
import signal
import subprocess
import sys
import time


def saved(folder: str) -> list[str]:
  """Prepared trailers renamed into place (not a kill's partial temp file)."""
  if not os.path.isdir(folder):
    return []
  return [f for f in os.listdir(folder) if f.endswith(".npz") and f[0] != "."]


def kill_after_saved(code: str, folder: str, at_least: int = 2) -> int:
  """Runs `python -c code` (a build), kills it and its workers once
  `folder` holds `at_least` saved trailers (or it ended, or 300 s);
  returns how many it saved."""
  proc = subprocess.Popen(
    [sys.executable, "-c", code],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    start_new_session=True,  # Its worker children die with it.
  )
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if len(saved(folder)) >= at_least:
      break
    time.sleep(0.05)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  return len(saved(folder))
