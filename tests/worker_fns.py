"""Worker functions for tests/test_dataset_workers.py (importable by path,
as spawned workers import them)."""

import os


def crash_once(item):
  """Dies the first time it sees `item` (marker files), then returns it."""
  marker, value = item
  if not os.path.exists(marker):
    open(marker, "w").close()
    os._exit(3)  # A worker death, not an exception.
  return value


def always_crash(item):
  os._exit(3)


def times_ten_or_die(item):
  """item = (value, crash_values): dies on a crash value, else value * 10."""
  value, crash_values = item
  if value in crash_values:
    os._exit(3)  # Like a decoder segfault: the worker process is gone.
  return value * 10
